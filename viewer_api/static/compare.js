// Side by side with another study of the patient ("so sánh với phim cũ"): the study's own viewer on the
// left, a read-only viewer of the chosen study on the right, each with its own series, slice, window and
// zoom. Scrolling one moves the other to the slice nearest in position along the slices' normal (Image
// Position / Orientation Patient of the series' WADO-RS metadata, read through the same audited endpoints
// as the images), or to the same fraction of its stack when positions are unknown or not comparable.
// Measurements and key images stay on the current study: the prior's viewer has no tools.

import { api } from "./api.js";
import { applyI18n, onLangChange, t } from "./i18n.js";
import { formatDate, h, listText } from "./util.js";
import { NON_IMAGE, Viewer, isImage } from "./viewer.js";

// |cos| between two slice normals for their positions to be compared: up to ~35 degrees, a head CT's gantry tilt
// against an untilted prior (their centres are compared along the normal), never a sagittal against an axial.
const PARALLEL = 0.8;

function values(dataset, tag) {
  const element = dataset && dataset[tag];
  return element && Array.isArray(element.Value) ? element.Value : null;
}

function vector(dataset, tag, n) {
  const v = values(dataset, tag);
  if (!v || v.length < n) return null;
  const out = v.slice(0, n).map(Number);
  return out.every(Number.isFinite) ? out : null;
}

function dot(a, b) {
  return a[0] * b[0] + a[1] * b[1] + a[2] * b[2];
}

/** The unit normal of the plane of Image Orientation (Patient) *o* (row and column cosines); null if none. */
function normalOf(o) {
  if (!o) return null;
  const n = [o[1] * o[5] - o[2] * o[4], o[2] * o[3] - o[0] * o[5], o[0] * o[4] - o[1] * o[3]];
  const length = Math.hypot(...n);
  return length > 0.5 ? n.map((x) => x / length) : null;
}

/** *normal* turned to point along its largest axis's positive side (+x left, +y posterior, +z head): the position
 * shown is then the same number for the same place whichever way a series' rows run (feet first, prone). */
function shownNormal(normal) {
  const axis = normal.reduce((best, v, i) => (Math.abs(v) > Math.abs(normal[best]) ? i : best), 0);
  return normal[axis] < 0 ? normal.map((v) => -v) : normal;
}

/** The first item of sequence *tag* in frame *frame*'s functional groups (per-frame, then shared). */
function frameItem(dataset, frame, tag) {
  for (const [groups, index] of [["52009230", frame], ["52009229", 0]]) {
    const item = (values(dataset, groups) || [])[index];
    const found = item && (values(item, tag) || [])[0];
    if (found) return found;
  }
  return null;
}

/** {position, normal} of frame *frame* (1-based, null: a single-frame image) of an instance's metadata. */
function planeOf(dataset, frame) {
  let position = vector(dataset, "00200032", 3);
  let orientation = vector(dataset, "00200037", 6);
  if (frame) { // an enhanced object keeps them in its functional groups
    position = vector(frameItem(dataset, frame - 1, "00209113"), "00200032", 3) || position;
    orientation = vector(frameItem(dataset, frame - 1, "00209116"), "00200037", 6) || orientation;
  }
  const normal = normalOf(orientation);
  if (!position || !normal) return null;
  // The slice's centre, not its top left corner (Image Position): between planes a few degrees apart (a head
  // CT's gantry tilt) the corners of a wide field are centimetres apart along the other's normal.
  let spacing = vector(dataset, "00280030", 2);
  if (frame) spacing = vector(frameItem(dataset, frame - 1, "00289110"), "00280030", 2) || spacing;
  const rows = Number((values(dataset, "00280010") || [])[0]);
  const columns = Number((values(dataset, "00280011") || [])[0]);
  if (spacing && rows > 0 && columns > 0) {
    const across = ((columns - 1) / 2) * spacing[1]; // along a row: the column spacing
    const down = ((rows - 1) / 2) * spacing[0];
    position = position.map((p, i) => p + orientation[i] * across + orientation[i + 3] * down);
  }
  return { position, normal };
}

/** The key of a viewer's series' positions: its slice count too (slices that arrived since are read again). */
function geometryKey(viewer) {
  return `${viewer.studyUid}/${viewer.series.series_uid}/${viewer.slices.length}`;
}

/** How well a series of the other study matches the one shown: same modality first, then description. */
function likeness(candidate, shown) {
  if (!shown) return 0;
  let score = 0;
  if (candidate.modality && candidate.modality === shown.modality) score += 4;
  const a = String(candidate.description || "").trim().toLowerCase();
  if (a && a === String(shown.description || "").trim().toLowerCase()) score += 2;
  if (candidate.series_number != null && candidate.series_number === shown.series_number) score += 1;
  return score;
}

export class Compare {
  /** *current*: the study screen's Viewer; *study*: its /api/studies answer; *other*: the uid of the study
   * to compare with; *onClose*: called by the close button. */
  constructor(current, study, other, onClose, cache = null) {
    this.current = current;
    this.study = study;
    this.otherUid = other;
    this.other = null; // its /api/studies answer, once read
    this.onClose = onClose;
    this.linked = true;
    this.syncing = false;
    this.syncingWindow = false;
    // The viewer the other one follows when the slices' positions become known: the one last moved by
    // the user (their ↑ on the prior before its positions arrived was undone: the prior jumped back).
    this.leader = current;
    this.windowLinked = false; // the window set on one side set on the other too (off: CT and MR differ)
    this.destroyed = false;
    // The slices' positions per series, kept by the study screen (*cache*): closing and opening the comparison
    // again (S, S) does not read two whole series' metadata again (hundreds of headers from S3, audited).
    const shared = cache || { geometry: new Map(), known: new Map() };
    this.geometry = shared.geometry; // "study/series" -> promise of {frameOfReference, planes: [{position, normal}|null]}
    this.known = shared.known; // the same, once read
    this.waiting = new Set(); // the keys whose reading this comparison waits for (to follow once known)
    this.prior = new Viewer(other, { prior: true });
    this.prior.active = false;
    for (const viewer of [this.current, this.prior]) {
      viewer.onActivate = (v) => this.setActive(v);
      viewer.onGo = () => this.moved(viewer);
      viewer.onWindow = () => this.windowMoved(viewer);
    }
    this.build();
    this.offLang = onLangChange(() => this.renderHeaders());
    this.setActive(this.current);
  }

  build() {
    this.linkButton = h("button#compare-link.btn.small.compare-link.active", {
      type: "button", "aria-pressed": "true", "data-i18n": "compare_link", "data-i18n-title": "compare_link_title",
      onclick: () => this.setLinked(!this.linked),
    });
    this.windowButton = h("button#compare-window.btn.small", {
      type: "button", "aria-pressed": "false", "data-i18n": "compare_window", "data-i18n-title": "compare_window_title",
      onclick: () => this.setWindowLinked(!this.windowLinked),
    });
    this.closeButton = h("button#compare-close.btn.small", {
      type: "button", "data-i18n": "compare_close", onclick: () => this.onClose(),
    });
    this.seriesSelect = h("select#compare-series.compare-series", {
      "data-i18n-aria": "compare_series", "data-i18n-title": "compare_series",
      onchange: () => {
        this.choose(this.seriesSelect.value);
        // The keys to its viewport now: a focused <select> takes ↑ ↓ as "the next series", not the next slice.
        this.prior.viewport.focus({ preventScroll: true });
      },
    });
    this.currentHead = h("div.compare-head");
    this.priorHead = h("div.compare-head");
    // In the header's row: the panes' rows stay of one height (style.css).
    this.priorError = h("div#compare-error.error.compare-error", { role: "alert", hidden: true });
    this.currentPane = h("section#compare-current.compare-pane.current", { dataset: { role: "current" } },
      h("div.compare-top", this.currentHead), this.current.element);
    this.priorPane = h("section#compare-prior.compare-pane.prior", { dataset: { role: "prior" } },
      h("div.compare-top", this.priorHead, this.priorError), this.prior.element);
    for (const pane of [this.currentPane, this.priorPane]) {
      // A click on the pane's header or selector chooses it too (the viewport's own click does through activate()).
      pane.addEventListener("pointerdown", () => this.setActive(pane === this.priorPane ? this.prior : this.current));
    }
    this.element = h("div#compare.compare", { dataset: { link: "on", linkMode: "" } },
      h("div.compare-bar", this.linkButton, this.windowButton, h("span.spacer"), this.closeButton),
      h("div.compare-panes", this.currentPane, this.priorPane));
    applyI18n(this.element);
    this.renderHeaders();
  }

  /** Read the other study and show its series most like the current one. */
  async load() {
    try {
      this.other = await api("GET", `/api/studies/${encodeURIComponent(this.otherUid)}`);
    } catch (exc) {
      if (this.destroyed) return;
      this.priorError.textContent = `${t("compare_error")}: ${exc.message}`;
      this.priorError.hidden = false;
      return;
    }
    if (this.destroyed) return;
    const images = (this.other.series || []).filter(
      (s) => !NON_IMAGE.has(s.modality) && (s.instances || []).some(isImage));
    this.seriesSelect.replaceChildren(...images.map((s) => h("option", { value: s.series_uid },
      [s.modality, s.series_number != null ? `#${s.series_number}` : "", s.description].filter(Boolean).join(" "))));
    this.renderHeaders();
    if (!images.length) {
      this.priorError.textContent = t("compare_no_series");
      this.priorError.hidden = false;
      return;
    }
    let best = images[0];
    for (const s of images) if (likeness(s, this.current.series) > likeness(best, this.current.series)) best = s;
    this.choose(best.series_uid);
  }

  /** Show series *uid* of the other study, at the slice nearest the current one's. */
  choose(uid) {
    const series = ((this.other && this.other.series) || []).find((s) => s.series_uid === uid);
    if (!series) return;
    this.seriesSelect.value = uid;
    this.syncing = true; // its first slice must not move the current viewer
    try {
      this.prior.setSeries(series);
    } finally {
      this.syncing = false;
    }
    this.mark(this.prior);
    this.leader = this.current; // the new series shows the current study's slice
    this.follow(this.current, this.prior);
  }

  setLinked(on) {
    this.linked = on;
    this.linkButton.setAttribute("aria-pressed", String(on));
    this.linkButton.classList.toggle("active", on);
    this.element.dataset.link = on ? "on" : "off";
    if (on) this.follow(this.active, this.partner(this.active)); // the other one comes back in step
  }

  setWindowLinked(on) {
    this.windowLinked = on;
    this.windowButton.setAttribute("aria-pressed", String(on));
    this.windowButton.classList.toggle("active", on);
    this.element.dataset.windowLink = on ? "on" : "off";
    if (on) this.windowMoved(this.active); // the other side takes the active one's window now
  }

  /** The window of *source* (a preset, or dragged) set on the other side too, when linked. */
  windowMoved(source) {
    if (!this.windowLinked || this.syncingWindow || this.destroyed) return;
    const target = this.partner(source);
    if (!target.series) return;
    this.syncingWindow = true;
    try {
      if (source.preset === "custom" && source.window) target.setWindow(source.window.c, source.window.w);
      else target.applyPreset(source.preset);
    } finally {
      this.syncingWindow = false;
    }
  }

  partner(viewer) {
    return viewer === this.prior ? this.current : this.prior;
  }

  /** The viewport the keys and the wheel go to. */
  setActive(viewer) {
    this.active = viewer;
    this.current.active = viewer === this.current;
    this.prior.active = viewer === this.prior;
    for (const [pane, v] of [[this.currentPane, this.current], [this.priorPane, this.prior]]) {
      pane.classList.toggle("active", v === viewer);
      pane.dataset.active = String(v === viewer);
    }
  }

  /** A viewer showed another slice: its attributes, then the other one follows it when linked. */
  moved(viewer) {
    this.mark(viewer);
    if (this.syncing) return;
    this.leader = viewer;
    this.follow(viewer, this.partner(viewer));
  }

  /** The positions of a viewer's slices (its series' metadata, read once per series). */
  planes(viewer) {
    if (!viewer.series) return null;
    const key = geometryKey(viewer);
    if (this.known.has(key)) return this.known.get(key);
    if (!this.geometry.has(key)) {
      const s = encodeURIComponent;
      const url = `/dicom-web/studies/${s(viewer.studyUid)}/series/${s(viewer.series.series_uid)}/metadata`;
      const slices = viewer.slices;
      const known = this.known;
      // A long series' metadata (every instance's header) may take a while from an S3 store.
      this.geometry.set(key, api("GET", url, { accept: "application/dicom+json", timeout: 180000 }).then((data) => {
        const sopOf = (d) => String((values(d, "00080018") || [""])[0]);
        const bySop = new Map((Array.isArray(data) ? data : []).map((d) => [sopOf(d), d]));
        const references = new Set();
        const planes = slices.map((slice) => {
          const dataset = bySop.get(slice.sop);
          if (!dataset) return null;
          references.add(String((values(dataset, "00200052") || [""])[0]));
          return planeOf(dataset, slice.frame);
        });
        return { frameOfReference: references.size === 1 ? [...references][0] : "", planes };
      }).catch(() => ({ frameOfReference: "", planes: [] })).then((geometry) => {
        known.set(key, geometry);
        return geometry;
      }));
    }
    if (!this.waiting.has(key)) {
      // This comparison's own follow-up (a reading begun by an earlier one, closed since, is waited for too).
      this.waiting.add(key);
      this.geometry.get(key).then(() => {
        if (this.destroyed) return;
        // Now known: the slices' positions are shown, and the side not last moved follows the other by them.
        this.mark(this.current);
        this.mark(this.prior);
        this.follow(this.leader, this.partner(this.leader));
      });
    }
    return null;
  }

  /** Where *target* goes for *source*'s slice: {index, mode} ("position" or "relative"), null: nowhere. */
  counterpart(source, target) {
    const n = target.slices.length;
    const m = source.slices.length;
    if (!n || !m || source.index < 0) return null;
    const a = this.planes(source);
    const b = this.planes(target);
    const from = a && a.planes[source.index];
    // Only the slices parallel to the one shown are compared: a localizer (scout) or the other planes of a
    // 3-plane series in the same series must not send the whole stack back to the fraction.
    const parallel = (p) => p && Math.abs(dot(p.normal, from.normal)) >= PARALLEL;
    if (from && b && b.planes.length === n && b.planes.some(parallel)) {
      const along = (p) => dot(p.position, from.normal);
      const there = b.planes.map((p) => (parallel(p) ? along(p) : null));
      const known = there.filter((q) => q !== null);
      const here = a.planes.filter(parallel).map(along);
      // Two frames of reference are two coordinate systems: positions are compared only where the two
      // stacks overlap (a scanner's table positions of the same region), else the same fraction is shown.
      const overlap = Math.min(Math.max(...here), Math.max(...known))
        >= Math.max(Math.min(...here), Math.min(...known));
      const nearest = (p) => {
        let best = -1;
        there.forEach((q, j) => {
          if (q !== null && (best < 0 || Math.abs(q - p) < Math.abs(there[best] - p))) best = j;
        });
        return best;
      };
      if ((a.frameOfReference && a.frameOfReference === b.frameOfReference) || overlap) {
        return { index: nearest(along(from)), mode: "position" };
      }
      // Apart (another scanner's table): the same fraction of the range of positions, not of the instance
      // order, so that a stack ordered feet to head still moves the way the other one does.
      const low = Math.min(...here);
      const span = Math.max(...here) - low;
      const lowThere = Math.min(...known);
      const spanThere = Math.max(...known) - lowThere;
      if (span > 0 && spanThere > 0) {
        return { index: nearest(lowThere + ((along(from) - low) / span) * spanThere), mode: "relative" };
      }
    }
    return { index: m > 1 ? Math.round((source.index / (m - 1)) * (n - 1)) : 0, mode: "relative" };
  }

  /** Move *target* to the slice matching *source*'s, when linked. */
  follow(source, target) {
    if (!this.linked || !source || !target || this.destroyed) return;
    // The user moved *source* (not its cine): the other side's cine stops, else it pulls both back at each frame.
    if (target.playing && !source.playing) target.stop();
    const to = this.counterpart(source, target);
    if (!to) return;
    this.element.dataset.linkMode = to.mode;
    if (to.index === target.index) return;
    this.syncing = true;
    try {
      target.go(to.index);
    } finally {
      this.syncing = false;
    }
  }

  /** The pane's attributes (tests and styles read them) and its header's position. */
  mark(viewer) {
    const pane = viewer === this.prior ? this.priorPane : this.currentPane;
    if (!pane) return;
    const key = viewer.series ? geometryKey(viewer) : "";
    const geometry = this.known.get(key);
    const plane = geometry && geometry.planes[viewer.index];
    pane.dataset.studyUid = viewer.studyUid;
    pane.dataset.seriesUid = viewer.series ? viewer.series.series_uid : "";
    pane.dataset.frame = String(viewer.index + 1);
    pane.dataset.total = String(viewer.slices.length);
    pane.dataset.position = plane ? String(Math.round(dot(plane.position, shownNormal(plane.normal)) * 100) / 100) : "";
    const where = pane.querySelector(".compare-position");
    if (where) where.textContent = plane ? `${t("compare_position")} ${pane.dataset.position} mm` : "";
  }

  renderHeaders() {
    const head = (el, kind, study) => {
      const info = study || {};
      el.replaceChildren(...[
        h(`span.compare-label.${kind}`, t(`compare_${kind}`)),
        h("b.compare-date", formatDate(info.study_date)),
        h("span.compare-modality", listText(info.modalities)),
        h("span.compare-description", { title: info.description || "" }, info.description || ""),
        kind === "current" ? null : this.seriesSelect,
        h("span.compare-position"),
      ].filter(Boolean));
    };
    head(this.currentHead, "current", this.study);
    // A later study than the one read is not a "prior": said so, not to be confused.
    const later = this.other && String(this.other.study_date || "") > String(this.study.study_date || "");
    head(this.priorHead, later ? "later" : "prior", this.other);
    this.mark(this.current);
    this.mark(this.prior);
  }

  /** Step through the other study's image series (← → while its viewport is the active one). */
  stepSeries(delta) {
    const options = [...this.seriesSelect.options];
    const i = options.findIndex((o) => o.value === this.seriesSelect.value);
    const next = options[Math.max(0, Math.min(options.length - 1, i + delta))];
    if (next && next.value !== this.seriesSelect.value) this.choose(next.value);
  }

  /** Back to the single viewer: the current one keeps its series, slice, window and zoom. */
  destroy() {
    this.destroyed = true;
    this.offLang();
    this.prior.destroy();
    this.current.onGo = null;
    this.current.onActivate = null;
    this.current.onWindow = null;
    this.current.active = true;
  }
}
