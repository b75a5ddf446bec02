// The image viewer: server-rendered JPEG slices (DICOMweb /rendered), slice
// scrolling (wheel, keys, slider), window/level presets and right/shift-drag,
// client-side zoom and pan (CSS transform), an in-memory image cache that
// preloads the neighbouring slices, and the measurement tools (measure.js).

import { api } from "./api.js";
import { onLangChange, t } from "./i18n.js";
import { MeasureTools } from "./measure.js";
import { StructuredReportView, isStructuredReport } from "./sr.js";
import { h, isTyping } from "./util.js";

export const PRESETS = [
  { name: "default", key: "preset_default", window: null },
  { name: "brain", key: "preset_brain", window: { c: 40, w: 80 } },
  { name: "lung", key: "preset_lung", window: { c: -600, w: 1500 } },
  { name: "bone", key: "preset_bone", window: { c: 400, w: 1800 } },
  { name: "abdomen", key: "preset_abdomen", window: { c: 40, w: 400 } },
];

// Series without pixel data to show (structured reports, key objects, states, PDFs).
const ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1";
export const NON_IMAGE = new Set(["SR", "KO", "PR", "DOC", "RWV", "REG", "SEG", "RTSTRUCT", "RTPLAN"]);

/** Whether an instance of /api/studies is a picture: it has Rows. Encapsulated
 * PDF / CDA, SR, KO and PR have none, whatever modality their series gives
 * (a scanned request form sent as OT was a slice that failed to render). */
export function isImage(inst) {
  return Number(inst.rows) > 0;
}

const CACHE_LIMIT = 80; // decoded images kept in memory
const PRELOAD_AHEAD = 4; // slices preloaded in the scroll direction
const PRELOAD_BEHIND = 2;
const WINDOW_THROTTLE_MS = 80; // at most one window/level render request per this
const WHEEL_STEP = 100; // wheel pixels per slice (one mouse notch)
const MIN_ZOOM = 0.25;
const MAX_ZOOM = 16;
const VIEWPORT_STEP = 64; // requested sizes are rounded to this (stable cache keys)
const MAX_VIEWPORT = 2048;
const DEFAULT_FPS = 15; // cine speed when the object gives none
const MAX_FPS = 60;

/** A number for a URL: integers stay integers, others keep 2 decimals. */
function num(value) {
  return Number.isInteger(value) ? String(value) : String(Math.round(value * 100) / 100);
}

function dicomValue(dataset, tag) {
  const element = dataset && dataset[tag];
  const value = element && element.Value && element.Value[0];
  if (value === undefined || value === null) return undefined;
  const n = Number(value);
  return Number.isFinite(n) ? n : undefined;
}

/** Frames per second a clip was acquired at: Recommended Display Frame Rate,
 * Cine Rate or Frame Time (ms); null when the object gives none. */
export function frameRateFromMetadata(dataset) {
  const rate = dicomValue(dataset, "00082144") || dicomValue(dataset, "00180040");
  if (rate > 0) return Math.min(MAX_FPS, rate);
  const frameTime = dicomValue(dataset, "00181063");
  return frameTime > 0 ? Math.min(MAX_FPS, 1000 / frameTime) : null;
}

/** The item of a functional group macro (a sequence's tag) for frame
 * `frame` (0-based) of an enhanced object: Per-Frame, then Shared
 * Functional Groups, as the server renders it; undefined when neither has it. */
function functionalGroup(dataset, frame, tag) {
  for (const [groups, index] of [["52009230", frame], ["52009229", 0]]) {
    const item = dataset && dataset[groups] && dataset[groups].Value && dataset[groups].Value[index];
    const macro = item && item[tag] && item[tag].Value && item[tag].Value[0];
    if (macro) return macro;
  }
  return undefined;
}

/** The window the server renders frame `frame` (0-based) with by default:
 * Enhanced CT / MR / XA keep it (Frame VOI LUT) and the rescale (Pixel
 * Value Transformation) in functional groups only, not at the top level. */
export function windowFromMetadata(dataset, frame = 0) {
  for (const holder of [functionalGroup(dataset, frame, "00289132"), dataset]) {
    const c = dicomValue(holder, "00281050");
    const w = dicomValue(holder, "00281051");
    if (c !== undefined && w !== undefined && w >= 1) return { c, w };
  }
  const bits = dicomValue(dataset, "00280101");
  if (!bits) return null;
  const signed = dicomValue(dataset, "00280103") === 1;
  const rescale = functionalGroup(dataset, frame, "00289145") || dataset;
  const slope = dicomValue(rescale, "00281053") ?? 1;
  const intercept = dicomValue(rescale, "00281052") ?? 0;
  const lo = signed ? -(2 ** (bits - 1)) : 0;
  const hi = signed ? 2 ** (bits - 1) - 1 : 2 ** bits - 1;
  const a = lo * slope + intercept;
  const b = hi * slope + intercept;
  return { c: Math.round((a + b) / 2), w: Math.max(1, Math.round(Math.abs(b - a) + 1)) };
}

export class Viewer {
  /** `options.prior`: a read-only viewer of another study beside this one (compare.js): its element ids get
   * the prefix "prior-", it has no measuring tools, and it takes keys only while it is the active one. */
  constructor(studyUid, options = {}) {
    this.studyUid = studyUid;
    this.readOnly = Boolean(options.prior);
    this.idPrefix = options.prior ? "prior-" : "";
    this.active = true; // the viewport the keys go to (two are shown side by side while comparing)
    this.onActivate = null; // called when the user clicks or scrolls in this viewport
    this.onGo = null; // called with the slice index whenever the slice shown changes (linked scrolling)
    this.onWindow = null; // called when the user changes the window (a preset, a drag): linked windows
    this.series = null;
    this.slices = []; // [{sop, frame}] frame is null for single-frame instances
    this.index = 0;
    this.preset = "default";
    this.window = null; // {c, w} or null: the server uses the object's own window
    this.defaultWindow = null; // the object's window, when known (for dragging)
    this.metadata = null; // {sop, dataset}: the instance defaultWindow is read from
    this.zoom = 1;
    this.tx = 0;
    this.ty = 0;
    this.viewportParam = "512,512";
    this.cache = new Map(); // url -> {img, promise, done}
    this.currentUrl = "";
    this.shownUrl = "";
    this.direction = 1;
    this.wheelAccumulator = 0;
    this.drag = null;
    this.windowGate = false;
    this.windowWanted = false;
    this.generation = 0; // bumps with every series change (drops stale work)
    this.multiframe = false; // the series' slices are frames of a clip (ultrasound, XA)
    this.fps = DEFAULT_FPS;
    this.playing = false;
    this.grids = new Map(); // sop -> {rows, columns}: the pixel grid measurements are drawn in
    this.shownKey = ""; // the frame (sop/frame) whose image is on screen
    this.measure = new MeasureTools(this);
    this.build();
  }

  // -- DOM -------------------------------------------------------------------------
  build() {
    this.presetButtons = PRESETS.map((p) =>
      h("button.btn.small.preset", {
        type: "button",
        dataset: { preset: p.name },
        "data-i18n": p.key,
        title: p.window ? `C ${p.window.c} / W ${p.window.w}` : "",
        onclick: () => this.applyPreset(p.name),
      }),
    );
    this.presetGroup = h("div.presets", { role: "group" }, this.presetButtons);
    this.wlLabel = h("span#wl-label.wl-label");
    this.zoomLabel = h("span#zoom-label.zoom-label", "100%");
    this.image = h("img#viewer-image", { alt: "", draggable: "false", hidden: true });
    this.error = h("div#viewer-error.viewer-error", { role: "alert", hidden: true });
    this.spinner = h("div.spinner", { hidden: true });
    this.overlay = h("div#viewer-overlay.overlay.top-left");
    this.viewport = h(
      "div#viewport.viewport",
      { tabindex: "0", "data-i18n-title": "viewer_help" },
      this.image,
      this.measure.layer,
      this.overlay,
      this.spinner,
      this.error,
    );
    this.slider = h("input#slice-slider.slider", { type: "range", min: "1", max: "1", value: "1", step: "1" });
    this.sliceLabel = h("span#slice-label.slice-label");
    this.playButton = h("button#cine-play.btn.small.icon", {
      type: "button", hidden: true, "data-i18n-title": "cine_help", onclick: () => this.togglePlay(),
    }, "▶");
    this.element = h(
      "div.viewer",
      h(
        "div.viewer-toolbar",
        this.presetGroup,
        this.measure.element,
        h("span.spacer"),
        h("button#zoom-out.btn.small.icon", { type: "button", "data-i18n-title": "zoom_out", onclick: () => this.zoomBy(1 / 1.25) }, "−"),
        this.zoomLabel,
        h("button#zoom-in.btn.small.icon", { type: "button", "data-i18n-title": "zoom_in", onclick: () => this.zoomBy(1.25) }, "+"),
        h("button#zoom-reset.btn.small", { type: "button", "data-i18n": "zoom_fit", "data-i18n-title": "zoom_reset", onclick: () => this.resetView() }),
      ),
      this.viewport,
      h("div.viewer-footer", this.playButton, this.slider, this.wlLabel, this.sliceLabel),
    );

    this.slider.addEventListener("input", () => {
      this.stop();
      this.go(Number(this.slider.value) - 1);
    });
    this.viewport.addEventListener("wheel", (e) => this.onWheel(e), { passive: false });
    this.viewport.addEventListener("pointerdown", (e) => this.onPointerDown(e));
    this.viewport.addEventListener("pointermove", (e) => this.onPointerMove(e));
    this.viewport.addEventListener("pointerup", (e) => this.onPointerUp(e));
    this.viewport.addEventListener("pointercancel", (e) => this.onPointerUp(e));
    this.viewport.addEventListener("contextmenu", (e) => e.preventDefault());
    // The viewport with the keyboard's focus (Tab, a click) is the one the keys go to.
    this.viewport.addEventListener("focus", () => {
      if (!this.active) this.activate();
    });
    this.viewport.addEventListener("dblclick", () => {
      if (this.measure.tool === "pointer") this.resetView(); // not the clicks of an angle
    });
    this.onKey = (e) => this.handleKey(e);
    document.addEventListener("keydown", this.onKey);
    this.resizeObserver = new ResizeObserver(() => this.onResize());
    this.resizeObserver.observe(this.viewport);
    this.offLang = onLangChange(() => this.updateLabels());
    if (this.readOnly) this.measure.element.hidden = true;
    if (this.idPrefix) {
      // A second viewer on the page: its ids must not be the first one's (tests and labels find those).
      for (const el of this.element.querySelectorAll("[id]")) el.id = `${this.idPrefix}${el.id}`;
    }
    this.measure.markTool();
    this.updateLabels();
  }

  /** The user chose this viewport (a click, the wheel): the study screen makes it the active one. */
  activate() {
    if (this.onActivate) this.onActivate(this);
  }

  destroy() {
    this.measure.destroy(); // measurements changed a moment ago are saved now
    this.stop();
    this.removeVideo();
    this.removeReports();
    clearTimeout(this.zoomTimer);
    document.removeEventListener("keydown", this.onKey);
    this.resizeObserver.disconnect();
    this.offLang();
    clearTimeout(this.resizeTimer);
    for (const entry of this.cache.values()) if (!entry.done) entry.img.src = "";
    this.cache.clear();
  }

  // -- series and slices -------------------------------------------------------------
  setSeries(series) {
    this.stop();
    this.generation += 1;
    this.series = series;
    this.slices = [];
    this.measure.cancel();
    this.grids = new Map((series.instances || []).map((inst) => [
      inst.sop_uid, { rows: Number(inst.rows) || 0, columns: Number(inst.columns) || 0 }]));
    this.removeVideo();
    this.removeReports();
    // A video (MPEG-2, H.264, HEVC) is one stream, not frames to render one by one.
    const videos = (series.instances || []).filter((inst) => inst.video);
    for (const inst of NON_IMAGE.has(series.modality) ? [] : (series.instances || []).filter((i) => isImage(i) && !i.video)) {
      const frames = Number(inst.frames) || 1;
      if (frames > 1) for (let f = 1; f <= frames; f += 1) this.slices.push({ sop: inst.sop_uid, frame: f });
      else this.slices.push({ sop: inst.sop_uid, frame: null });
    }
    this.defaultWindow = null;
    this.metadata = null;
    this.multiframe = this.slices.some((slice) => slice.frame);
    // The largest image of the series: zooming asks for more pixels, up to these.
    this.native = { w: 0, h: 0 };
    for (const inst of series.instances || []) {
      this.native.w = Math.max(this.native.w, Number(inst.columns) || 0);
      this.native.h = Math.max(this.native.h, Number(inst.rows) || 0);
    }
    this.fps = DEFAULT_FPS;
    this.resetView();
    this.viewportParam = this.computeViewport();
    const n = this.slices.length;
    this.showImageTools(n > 0);
    this.playButton.hidden = n <= 1;
    this.slider.max = String(Math.max(1, n));
    this.slider.disabled = n <= 1;
    const parts = [series.modality, series.series_number != null ? `#${series.series_number}` : "", series.description];
    this.overlay.textContent = parts.filter((p) => p !== undefined && p !== null && p !== "").join("  ");
    this.index = -1;
    this.shownUrl = "";
    this.shownKey = "";
    // The previous series' image must not stay on screen under this one's
    // label (a slow or failing render): blank until its first slice is shown.
    this.image.hidden = true;
    this.error.hidden = true;
    delete this.viewport.dataset.shownUrl;
    if (!n) {
      this.currentUrl = "";
      const documents = (series.instances || []).filter((inst) => inst.sop_class_uid === ENCAPSULATED_PDF);
      const reports = (series.instances || []).filter(isStructuredReport);
      if (videos.length) this.showVideo(series, videos[0]);
      else if (documents.length) this.showDocuments(series, documents);
      else if (reports.length) this.showReports(reports);
      else this.showError(t("no_image"));
      this.updateLabels();
      return;
    }
    this.go(0);
    this.loadDefaultWindow(series, this.generation);
  }

  /** The window presets and the measuring tools act on an image's slices: hidden while a structured report,
   * a PDF or a video is shown, where they would do nothing (a tool chosen there stays for the next image). */
  showImageTools(shown) {
    this.presetGroup.hidden = !shown;
    this.wlLabel.hidden = !shown;
    this.measure.element.hidden = !shown || this.readOnly; // nothing is measured on a prior
  }

  async loadDefaultWindow(series, generation) {
    const inst = (series.instances || [])[Math.floor(((series.instances || []).length - 1) / 2)];
    if (!inst) return;
    try {
      const url = `/dicom-web/studies/${encodeURIComponent(this.studyUid)}/series/${encodeURIComponent(series.series_uid)}/instances/${encodeURIComponent(inst.sop_uid)}/metadata`;
      const data = await api("GET", url, { accept: "application/dicom+json" });
      if (generation !== this.generation) return;
      const dataset = Array.isArray(data) ? data[0] : data;
      this.metadata = { sop: inst.sop_uid, dataset };
      this.fps = frameRateFromMetadata(dataset) || DEFAULT_FPS;
      this.updateLabels();
    } catch {
      /* dragging then starts from a generic window */
    }
  }

  /** The pixel grid (Rows x Columns) of an instance of the series; null when unknown. */
  gridOf(sop) {
    const grid = this.grids.get(sop);
    return grid && grid.rows > 0 && grid.columns > 0 ? grid : null;
  }

  urlFor(i) {
    const slice = this.slices[i];
    const s = encodeURIComponent;
    let url = `/dicom-web/studies/${s(this.studyUid)}/series/${s(this.series.series_uid)}/instances/${s(slice.sop)}`;
    if (slice.frame) url += `/frames/${slice.frame}`;
    url += "/rendered?";
    if (this.window) url += `window=${num(this.window.c)},${num(this.window.w)},linear&`;
    return `${url}viewport=${this.viewportParam}`;
  }

  /** Show slice i (clamped); returns a promise settled once it is on screen. */
  go(i) {
    const n = this.slices.length;
    if (!n) return Promise.resolve();
    const next = Math.max(0, Math.min(n - 1, i));
    if (next !== this.index) this.direction = next >= this.index ? 1 : -1;
    this.index = next;
    this.updateLabels();
    const shown = this.show();
    if (this.onGo) this.onGo(next);
    return shown;
  }

  step(delta) {
    if (this.slices.length) this.go(this.index + delta);
  }

  show() {
    if (!this.slices.length || this.index < 0) return Promise.resolve();
    const url = this.urlFor(this.index);
    this.currentUrl = url;
    const generation = this.generation;
    const entry = this.load(url, false);
    this.cancelStale();
    if (!entry.done) this.spinnerTimer = this.spinnerTimer || setTimeout(() => (this.spinner.hidden = false), 150);
    return entry.promise.then(
      (img) => {
        if (this.currentUrl !== url || generation !== this.generation) return;
        this.display(img, url);
        this.preload();
      },
      () => {
        if (this.currentUrl !== url || generation !== this.generation) return;
        this.stopSpinner();
        // Not the previous image under this slice's label and the message.
        this.image.hidden = true;
        this.showError(t("image_error"));
        // <img> hides the status: a lost session (401) sends the user to the login
        api("GET", "/api/me").catch(() => {});
      },
    );
  }

  /** Swap the cached <img> node into the viewport: no second request, no flicker. */
  display(img, url) {
    this.stopSpinner();
    this.error.hidden = true;
    if (this.image !== img) {
      this.image.removeAttribute("id");
      img.id = `${this.idPrefix}viewer-image`;
      img.alt = "";
      img.draggable = false;
      img.hidden = false;
      this.image.replaceWith(img);
      this.image = img;
    }
    img.hidden = false;
    this.shownUrl = url;
    this.shownKey = this.measure.currentKey(); // the frame on screen: what measurements are drawn on
    this.viewport.dataset.shownUrl = url;
    this.layout();
  }

  stopSpinner() {
    clearTimeout(this.spinnerTimer);
    this.spinnerTimer = 0;
    this.spinner.hidden = true;
  }

  showError(message) {
    this.error.textContent = message;
    this.error.hidden = false;
  }

  /** A video series: the browser plays the stored stream (bulk/7FE00010, byte ranges for seeking). */
  showVideo(series, inst) {
    const s = encodeURIComponent;
    const src = `/dicom-web/studies/${s(this.studyUid)}/series/${s(series.series_uid)}/instances/${s(inst.sop_uid)}`
      + `/bulk/7FE00010?accept=${s(inst.video)}`;
    this.video = h("video.viewer-video", { id: `${this.idPrefix}viewer-video`, controls: true, preload: "metadata", src });
    this.video.onerror = () => this.showError(t("image_error"));
    this.viewport.insertBefore(this.video, this.overlay);
  }

  removeVideo() {
    if (!this.video) return;
    this.video.pause();
    this.video.removeAttribute("src");
    this.video.remove();
    this.video = null;
  }

  /** A series of structured reports (SR, dose reports, key images): each one as a document; its image
   * links call onOpenImage (set by the study screen). */
  showReports(reports) {
    this.reports = new StructuredReportView((ref) => (this.onOpenImage ? this.onOpenImage(ref) : undefined));
    this.viewport.insertBefore(this.reports.element, this.overlay);
    this.reports.show(reports);
  }

  removeReports() {
    if (!this.reports) return;
    this.reports.generation += 1; // a document still loading is not shown
    this.reports.element.remove();
    this.reports = null;
  }

  /** Whether an event happens in a structured report's document (it scrolls and selects text itself). */
  inReports(event) {
    return Boolean(this.reports && event.target instanceof Element && event.target.closest(".sr-documents"));
  }

  /** A series of PDFs (the signed reports): links that open each one. */
  showDocuments(series, documents) {
    const s = encodeURIComponent;
    this.error.replaceChildren(
      h("p", t("documents")),
      ...documents.map((inst, i) => h("a.btn.document-link", {
        href: `/wado?requestType=WADO&studyUID=${s(this.studyUid)}&seriesUID=${s(series.series_uid)}`
          + `&objectUID=${s(inst.sop_uid)}&contentType=application/pdf`,
        target: "_blank", rel: "noopener",
      }, `${t("open_pdf")}${documents.length > 1 ? ` ${i + 1}` : ""}`)),
    );
    this.error.hidden = false;
  }

  load(url, low) {
    let entry = this.cache.get(url);
    if (entry) {
      this.cache.delete(url); // most recently used goes last
      this.cache.set(url, entry);
      return entry;
    }
    const img = new Image();
    img.decoding = "async";
    if (low) img.fetchPriority = "low";
    entry = { img, done: false, low: Boolean(low), promise: null };
    entry.promise = new Promise((resolve, reject) => {
      img.onload = () => {
        entry.done = true;
        // decode off the main thread before it is shown
        (img.decode ? img.decode().catch(() => {}) : Promise.resolve()).then(() => resolve(img));
      };
      img.onerror = () => {
        if (this.cache.get(url) === entry) this.cache.delete(url); // not a newer request of the URL
        reject(new Error(`image failed: ${url}`));
      };
    });
    entry.promise.catch(() => {});
    img.src = url;
    this.cache.set(url, entry);
    for (const [oldUrl, old] of this.cache) {
      if (this.cache.size <= CACHE_LIMIT) break;
      if (old.img === this.image || old === entry) continue; // never the one on screen
      if (!old.done) old.img.src = "";
      this.cache.delete(oldUrl);
    }
    return entry;
  }

  /** The URLs of the slices preload() asks for around the current one. */
  preloadUrls() {
    const n = this.slices.length;
    const ahead = this.direction >= 0 ? PRELOAD_AHEAD : PRELOAD_BEHIND;
    const behind = this.direction >= 0 ? PRELOAD_BEHIND : PRELOAD_AHEAD;
    const order = [];
    for (let d = 1; d <= Math.max(ahead, behind); d += 1) {
      if (d <= ahead) order.push(this.index + d * (this.direction >= 0 ? 1 : -1));
      if (d <= behind) order.push(this.index - d * (this.direction >= 0 ? 1 : -1));
    }
    return order.filter((i) => i >= 0 && i < n).map((i) => this.urlFor(i));
  }

  preload() {
    for (const url of this.preloadUrls()) this.load(url, true);
  }

  /** Drop the requests of slices scrolled past: a fast wheel asked for
   * each, and the slice stopped on waited behind all of them. */
  cancelStale() {
    const wanted = new Set(this.preloadUrls());
    wanted.add(this.currentUrl);
    for (const [url, entry] of this.cache) {
      if (entry.done || entry.low || wanted.has(url) || entry.img === this.image) continue;
      this.cache.delete(url);
      entry.img.src = "";
    }
  }

  // -- window / level -----------------------------------------------------------------
  applyPreset(name) {
    const preset = PRESETS.find((p) => p.name === name);
    if (!preset) return;
    this.preset = name;
    this.window = preset.window ? { ...preset.window } : null;
    this.updateLabels();
    this.show();
    if (this.onWindow) this.onWindow(this);
  }

  setWindow(c, w) {
    this.preset = "custom";
    this.window = { c: Math.round(c), w: Math.max(1, Math.round(w)) };
    this.updateLabels();
    this.requestWindowRender();
    if (this.onWindow) this.onWindow(this);
  }

  /** Latest-wins, one request in flight, at most one per WINDOW_THROTTLE_MS. */
  requestWindowRender() {
    this.windowWanted = true;
    if (this.windowGate) return;
    const run = () => {
      if (!this.windowWanted) {
        this.windowGate = false;
        return;
      }
      this.windowWanted = false;
      this.windowGate = true;
      const started = performance.now();
      this.show().finally(() => {
        setTimeout(run, Math.max(0, WINDOW_THROTTLE_MS - (performance.now() - started)));
      });
    };
    run();
  }

  startWindow() {
    if (this.window) return { ...this.window };
    if (this.defaultWindow) return { ...this.defaultWindow };
    return this.series && this.series.modality === "CT" ? { c: 40, w: 400 } : { c: 128, w: 256 };
  }

  // -- cine ---------------------------------------------------------------------------
  togglePlay() {
    if (this.playing) this.stop();
    else this.play();
  }

  /** Loop through the slices / frames at the clip's own rate; each next
   * frame is asked for only once the current one is on screen. */
  play() {
    if (this.playing || this.slices.length <= 1) return;
    this.playing = true;
    const generation = this.generation;
    this.playButton.textContent = "❚❚";
    this.playButton.classList.add("active");
    this.playButton.setAttribute("aria-pressed", "true");
    const tick = async () => {
      if (!this.playing || generation !== this.generation) return;
      const started = performance.now();
      await this.go((this.index + 1) % this.slices.length);
      if (!this.playing || generation !== this.generation) return;
      const wait = Math.max(0, 1000 / this.fps - (performance.now() - started));
      this.playTimer = setTimeout(tick, wait);
    };
    this.playTimer = setTimeout(tick, 0);
  }

  stop() {
    this.playing = false;
    clearTimeout(this.playTimer);
    if (!this.playButton) return;
    this.playButton.textContent = "▶";
    this.playButton.classList.remove("active");
    this.playButton.setAttribute("aria-pressed", "false");
  }

  // -- zoom / pan ---------------------------------------------------------------------
  resetView() {
    const zoomed = this.zoom > 1;
    this.zoom = 1;
    this.tx = 0;
    this.ty = 0;
    this.applyTransform();
    if (zoomed) this.refreshResolution();
  }

  zoomBy(factor, clientX, clientY) {
    const zoom = Math.max(MIN_ZOOM, Math.min(MAX_ZOOM, this.zoom * factor));
    if (zoom === this.zoom) return;
    const rect = this.viewport.getBoundingClientRect();
    const cx = rect.width / 2;
    const cy = rect.height / 2;
    // keep the point under the cursor (or the centre) where it is
    const qx = clientX === undefined ? cx : clientX - rect.left;
    const qy = clientY === undefined ? cy : clientY - rect.top;
    this.tx = qx - cx - (zoom * (qx - cx - this.tx)) / this.zoom;
    this.ty = qy - cy - (zoom * (qy - cy - this.ty)) / this.zoom;
    this.zoom = zoom;
    this.applyTransform();
    this.refreshResolution();
  }

  applyTransform() {
    if (this.image) this.image.style.transform = `translate(${this.tx}px, ${this.ty}px) scale(${this.zoom})`;
    this.zoomLabel.textContent = `${Math.round(this.zoom * 100)}%`;
    this.viewport.classList.toggle("zoomed", this.zoom > 1);
    this.measure.redraw(); // measurements follow the image
  }

  /** Fit the image in the viewport (the transform then zooms / pans it). */
  layout() {
    const img = this.image;
    if (!img || !img.naturalWidth) return;
    const cw = this.viewport.clientWidth;
    const ch = this.viewport.clientHeight;
    const scale = Math.min(cw / img.naturalWidth, ch / img.naturalHeight);
    const w = Math.max(1, Math.round(img.naturalWidth * scale));
    const hgt = Math.max(1, Math.round(img.naturalHeight * scale));
    img.style.width = `${w}px`;
    img.style.height = `${hgt}px`;
    img.style.left = `${Math.round((cw - w) / 2)}px`;
    img.style.top = `${Math.round((ch - hgt) / 2)}px`;
    this.applyTransform();
  }

  /** The rendered size to ask for: the viewport's pixels, times the zoom
   * (a zoomed 2k x 2k radiograph shows its own pixels, not an enlarged
   * screen-sized copy), never beyond the image's own size. */
  computeViewport() {
    const dpr = Math.min(2, window.devicePixelRatio || 1);
    const zoom = Math.max(1, this.zoom);
    const round = (v, native) => {
      const fit = v * dpr;
      const wanted = Math.min(fit * zoom, Math.max(fit, native || 0));
      return Math.max(VIEWPORT_STEP, Math.min(MAX_VIEWPORT, Math.ceil(wanted / VIEWPORT_STEP) * VIEWPORT_STEP));
    };
    const native = this.native || { w: 0, h: 0 };
    return `${round(this.viewport.clientWidth || 512, native.w)},${round(this.viewport.clientHeight || 512, native.h)}`;
  }

  /** After the zoom settles, fetch the sharper (or, back at 100 %, the lighter) rendering. */
  refreshResolution() {
    clearTimeout(this.zoomTimer);
    this.zoomTimer = setTimeout(() => {
      const param = this.computeViewport();
      if (param !== this.viewportParam && this.series && this.slices.length) {
        this.viewportParam = param;
        this.show();
      }
    }, 250);
  }

  onResize() {
    this.layout();
    clearTimeout(this.resizeTimer);
    this.resizeTimer = setTimeout(() => {
      const param = this.computeViewport();
      if (param !== this.viewportParam && this.series) {
        this.viewportParam = param;
        this.show();
      }
    }, 300);
  }

  // -- input --------------------------------------------------------------------------
  onWheel(event) {
    if (this.inReports(event)) return; // the document scrolls
    event.preventDefault();
    if (!this.active) this.activate();
    const unit = event.deltaMode === 1 ? 33 : event.deltaMode === 2 ? WHEEL_STEP : 1;
    const delta = event.deltaY * unit;
    if (event.ctrlKey || event.metaKey) {
      this.zoomBy(Math.exp(-delta / 500), event.clientX, event.clientY);
      return;
    }
    this.stop();
    if (Math.sign(delta) !== Math.sign(this.wheelAccumulator)) this.wheelAccumulator = 0;
    this.wheelAccumulator += delta;
    let steps = Math.trunc(this.wheelAccumulator / WHEEL_STEP);
    if (!steps && Math.abs(delta) >= WHEEL_STEP / 2) steps = Math.sign(delta); // a short notch
    if (steps) {
      this.wheelAccumulator -= steps * WHEEL_STEP;
      if (Math.sign(this.wheelAccumulator) !== Math.sign(delta)) this.wheelAccumulator = 0;
      this.step(steps);
    }
  }

  onPointerDown(event) {
    // A document's link takes its own click (captured, it went to the viewport).
    if (event.target instanceof Element && event.target.closest("a, video")) return; // and a video's controls
    if (this.inReports(event)) return; // text is selected there, not a window dragged
    this.viewport.focus({ preventScroll: true });
    if (!this.active) this.activate();
    // A measuring tool takes the left button (Shift+drag still sets the window).
    if (event.button === 0 && !event.shiftKey && (this.measure.drawing || this.measure.wants(event))) {
      if (this.measure.pointerDown(event)) {
        event.preventDefault();
        return;
      }
    }
    let mode = null;
    if (event.button === 2 || (event.button === 0 && event.shiftKey)) mode = "window";
    else if (event.button === 0 && this.zoom > 1) mode = "pan";
    else if (event.button === 0) mode = "scroll";
    else if (event.button === 1) mode = "pan";
    if (!mode) return;
    event.preventDefault();
    this.viewport.setPointerCapture(event.pointerId);
    this.drag = {
      mode, id: event.pointerId, x: event.clientX, y: event.clientY,
      tx: this.tx, ty: this.ty, index: this.index, window: mode === "window" ? this.startWindow() : null,
    };
    this.viewport.classList.add(`dragging-${mode}`);
  }

  onPointerMove(event) {
    if (this.measure.pointerMove(event)) return;
    const d = this.drag;
    if (!d || d.id !== event.pointerId) return;
    const dx = event.clientX - d.x;
    const dy = event.clientY - d.y;
    if (d.mode === "pan") {
      this.tx = d.tx + dx;
      this.ty = d.ty + dy;
      this.applyTransform();
    } else if (d.mode === "window") {
      const k = Math.max(0.5, d.window.w / 300);
      this.setWindow(d.window.c + dy * k, d.window.w + dx * k);
    } else if (d.mode === "scroll") {
      const target = d.index + Math.trunc(dy / 8);
      if (target !== this.index) this.go(target);
    }
  }

  onPointerUp(event) {
    if (this.measure.pointerUp(event)) return;
    const d = this.drag;
    if (!d || d.id !== event.pointerId) return;
    this.viewport.classList.remove(`dragging-${d.mode}`);
    this.drag = null;
    if (this.viewport.hasPointerCapture(event.pointerId)) this.viewport.releasePointerCapture(event.pointerId);
  }

  handleKey(event) {
    if (event.defaultPrevented || isTyping(event) || event.altKey || !this.series || !this.active) return;
    if (event.target === this.slider && /^(Arrow|Page|Home|End)/.test(event.key)) return; // the slider moves itself
    if (this.reports && /^(Arrow(Up|Down)|Page|Home|End| )/.test(event.key)) return; // a report's document scrolls
    // No slice (a report, a PDF, a video): the image keys (tools V/L/A/R, C, Delete, presets 1-5, zoom) do nothing.
    if (!this.slices.length) return;
    const target = event.target;
    if (target instanceof HTMLElement && target.tagName === "BUTTON" && (event.key === "Enter" || event.key === " ")) return;
    if (!this.readOnly && this.measure.handleKey(event)) {
      event.preventDefault(); // Escape cancels the drawing, not the study
      return;
    }
    const n = this.slices.length;
    let handled = true;
    if (this.playing && event.key !== "p" && event.key !== "P") this.stop(); // the user takes over
    switch (event.key) {
      case "p":
      case "P":
        this.togglePlay();
        break;
      case "ArrowDown":
      case "PageDown":
        this.step(1);
        break;
      case "ArrowUp":
      case "PageUp":
        this.step(-1);
        break;
      case "Home":
        this.go(0);
        break;
      case "End":
        this.go(n - 1);
        break;
      case "+":
      case "=":
        if (event.ctrlKey || event.metaKey) handled = false;
        else this.zoomBy(1.25);
        break;
      case "-":
        if (event.ctrlKey || event.metaKey) handled = false;
        else this.zoomBy(1 / 1.25);
        break;
      case "0":
        this.resetView();
        break;
      default: {
        const digit = /^[1-9]$/.test(event.key) && !event.ctrlKey && !event.metaKey ? Number(event.key) : 0;
        if (digit && digit <= PRESETS.length) this.applyPreset(PRESETS[digit - 1].name);
        else handled = false;
      }
    }
    if (handled) event.preventDefault();
  }

  /** The object's window for the slice shown: an enhanced object may give
   * each frame its own. Other instances of the series use the first frame's. */
  frameWindow() {
    const m = this.metadata;
    if (!m) return null;
    const slice = this.slices[this.index];
    const frame = slice && slice.sop === m.sop && slice.frame ? slice.frame - 1 : 0;
    return windowFromMetadata(m.dataset, frame);
  }

  // -- labels -------------------------------------------------------------------------
  updateLabels() {
    if (this.onChange) this.onChange();
    const n = this.slices.length;
    const unit = t(this.multiframe ? "frame" : "slice");
    this.sliceLabel.textContent = n ? `${unit} ${this.index + 1} / ${n}` : `${unit} – / –`;
    this.sliceLabel.dataset.index = String(this.index + 1);
    this.sliceLabel.dataset.total = String(n);
    if (n && Number(this.slider.value) !== this.index + 1) this.slider.value = String(this.index + 1);
    for (const button of this.presetButtons) {
      const active = button.dataset.preset === this.preset;
      button.classList.toggle("active", active);
      button.setAttribute("aria-pressed", String(active));
    }
    this.defaultWindow = this.frameWindow();
    const shown = this.window || this.defaultWindow;
    let text = shown ? `C ${num(shown.c)} / W ${num(shown.w)}` : "C / W";
    if (!this.window) text += ` (${t("window_default")})`;
    this.wlLabel.textContent = text;
    this.wlLabel.dataset.preset = this.preset;
    this.measure.redraw(); // the slice's own measurements, in the language shown
  }
}
