// Key images (ảnh chính): the radiologist marks the image or frame shown
// (the toolbar's toggle or the K key, never while typing in the report) and
// the selection is saved at once as their Key Object Selection of the study
// (PUT /api/studies/{uid}/key-images). Every reader sees a star on the
// frame counter of a key image and on the thumbnails of series holding some.

import { api } from "./api.js";
import { onLangChange, t } from "./i18n.js";
import { h, isTyping } from "./util.js";

const EDITOR_ROLES = new Set(["radiologist", "admin"]);

/** "sop|frame" of an image entry (frame null: a single-frame image or the whole instance). */
function keyOf(sop, frame) {
  return `${sop}|${frame || ""}`;
}

export class KeyImages {
  constructor(studyUid, user, viewer) {
    this.studyUid = studyUid;
    this.viewer = viewer;
    this.canEdit = Boolean(user && EDITOR_ROLES.has(user.role));
    this.images = []; // every key image of the study (not rejection notes), from every KOS
    this.mine = []; // [{sop_uid, frame}]: this user's own selection, in the order marked
    this.title = null; // the own selection's title and description, kept when it is saved again
    this.description = null;
    // Whether the server's selection has been read: until then this.mine is not what is saved, and a
    // PUT of it (K pressed while the study opens, or after the GET failed) replaced the saved selection.
    this.loaded = false;
    this.saved = { images: [], mine: [] }; // the server's last answer, shown again when a save fails
    this.saving = null; // the PUT in flight
    this.again = false; // another change made while it was in flight
    this.onChange = null;
    this.button = h("button#key-image-toggle.btn.small.key-toggle", {
      type: "button", hidden: !this.canEdit, "aria-pressed": "false", "data-i18n-title": "key_image_help",
      title: t("key_image_help"), onclick: () => this.toggle(),
    });
    this.marker = h("span#key-image-marker.key-marker", {
      hidden: true, "data-i18n-title": "key_image", title: t("key_image"), "aria-label": t("key_image"),
    }, "★");
    this.state = h("span#key-image-state.key-state", { role: "status" });
    this.said = null; // what the state says: {key, n, detail}, redrawn in the language chosen
    this.onKey = (event) => this.handleKey(event);
    document.addEventListener("keydown", this.onKey);
    this.offLang = onLangChange(() => this.refresh());
    this.refresh();
  }

  destroy() {
    document.removeEventListener("keydown", this.onKey);
    this.offLang();
  }

  async load() {
    try {
      this.apply(await api("GET", `/api/studies/${encodeURIComponent(this.studyUid)}/key-images`));
      if (this.said && this.said.key === "key_not_loaded") this.say("", "");
    } catch {
      /* the images are shown without their stars */
    }
  }

  /** Take the server's view of the study's key images. */
  apply(data) {
    this.images = ((data && data.images) || []).filter((i) => i.key);
    this.mine = ((data && data.mine) || []).map((m) => ({ sop_uid: m.sop_uid, frame: m.frame }));
    this.saved = { images: this.images.slice(), mine: this.mine.slice() };
    this.loaded = true;
    const own = ((data && data.documents) || []).find((d) => d.own && !d.error);
    this.title = own && own.title ? own.title.value : null;
    this.description = own ? own.description || null : null;
    this.refresh();
    if (this.onChange) this.onChange();
  }

  /** The slice shown: {sop_uid, frame} (frame null for a single-frame image), or null. */
  current() {
    const v = this.viewer;
    const slice = v.slices && v.index >= 0 ? v.slices[v.index] : null;
    return slice ? { sop_uid: slice.sop, frame: slice.frame || null } : null;
  }

  /** Whether an image (a frame of it) is a key image of anyone's, or (own) of this user's. */
  isKey(sop, frame, own = false) {
    const list = own ? this.mine : this.images;
    return list.some((i) => i.sop_uid === sop && (!i.frame || !frame || i.frame === frame));
  }

  /** How many key images a series holds (for its thumbnail). */
  countIn(seriesUid) {
    return new Set(this.images.filter((i) => i.series_uid === seriesUid).map((i) => keyOf(i.sop_uid, i.frame))).size;
  }

  refresh() {
    const at = this.current();
    const key = Boolean(at && this.isKey(at.sop_uid, at.frame));
    const own = Boolean(at && this.isKey(at.sop_uid, at.frame, true));
    this.marker.hidden = !key;
    this.marker.title = t("key_image");
    this.button.disabled = !at;
    this.button.textContent = `${own ? "★" : "☆"} ${t("key_image")}`;
    this.button.classList.toggle("active", own);
    this.button.setAttribute("aria-pressed", String(own));
    this.button.dataset.loaded = String(this.loaded); // the saved selection read (tests wait for it)
    this.button.title = t("key_image_help");
    if (this.said) {
      const { key, n, detail } = this.said;
      this.state.textContent = key ? t(key, { n }) + (detail ? `: ${detail}` : "") : "";
    }
  }

  /** The save state shown by the frame counter: *kind* "" (saving), "saved" or "error". */
  say(key, kind, n = 0, detail = "") {
    this.said = { key, n, detail };
    this.state.className = `key-state ${kind}`.trim();
    if (kind === "saved") this.state.dataset.saved = String(n);
    else delete this.state.dataset.saved;
    this.refresh();
  }

  handleKey(event) {
    if (event.defaultPrevented || isTyping(event) || event.ctrlKey || event.metaKey || event.altKey) return;
    if (event.key !== "k" && event.key !== "K") return;
    // While comparing, K marks only when the current study's viewport is the active one (not the prior's).
    if (!this.canEdit || !this.current() || this.viewer.active === false) return;
    event.preventDefault();
    // K held down repeats: each repeat toggled again and saved, leaving the mark to chance.
    if (event.repeat) return;
    this.toggle();
  }

  /** Mark the slice shown, or unmark it (a whole instance marked: the instance), and save. */
  toggle() {
    const at = this.current();
    if (!this.canEdit || !at) return;
    if (!this.loaded) {
      // The saved selection is not known yet: a save now would replace it with this one image.
      this.say("key_not_loaded", "error");
      this.load();
      return;
    }
    if (this.isKey(at.sop_uid, at.frame, true)) {
      const same = (m) => m.sop_uid === at.sop_uid && (!m.frame || !at.frame || m.frame === at.frame);
      this.mine = this.mine.filter((m) => !same(m));
    } else {
      this.mine.push(at);
    }
    // Shown at once; the server's answer then says what is stored.
    const series = this.viewer.series ? this.viewer.series.series_uid : "";
    this.images = this.images.filter((i) => !i.own);
    for (const m of this.mine) {
      const known = this.images.find((i) => i.sop_uid === m.sop_uid) || {};
      this.images.push({ ...m, series_uid: known.series_uid || series, own: true, key: true });
    }
    this.refresh();
    if (this.onChange) this.onChange();
    this.save();
  }

  /** Once no save is on its way (the one in flight, and the one a change made meanwhile queued after
   * it): a report signed meanwhile printed the key images as they were before the last mark. */
  async settled() {
    while (this.saving) {
      try {
        await this.saving;
      } catch {
        /* the state says it was not saved; the signature goes on with what the server holds */
      }
      await null; // save() takes its answer first: it clears this.saving, or starts the queued PUT
    }
  }

  /** PUT the selection; changes made meanwhile go in one more PUT after it (latest wins, in order). */
  async save() {
    if (this.saving) {
      this.again = true;
      return;
    }
    this.say("key_saving", "");
    const images = this.mine.map((m) => (m.frame ? { sop_uid: m.sop_uid, frame: m.frame } : { sop_uid: m.sop_uid }));
    const body = { images };
    if (this.title) body.title = this.title;
    if (this.description) body.description = this.description;
    this.saving = api("PUT", `/api/studies/${encodeURIComponent(this.studyUid)}/key-images`, { json: body });
    try {
      const data = await this.saving;
      this.saving = null;
      if (this.again) {
        this.again = false;
        this.save();
        return;
      }
      this.apply(data);
      const n = this.mine.length;
      this.say(n ? "key_saved" : "key_removed", "saved", n);
    } catch (exc) {
      this.saving = null;
      this.again = false;
      // What the server held before, at once: the stars must not show as saved what was not (the
      // reload below may fail as the save did, on a link that is down).
      this.images = this.saved.images.slice();
      this.mine = this.saved.mine.slice();
      if (this.onChange) this.onChange();
      this.say("key_error", "error", 0, exc.message);
      this.load(); // what the server holds, not what failed
    }
  }
}
