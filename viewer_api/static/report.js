// The report panel: draft editing (findings / impression), save, sign, amend,
// signed read-only view with the PDF link, version history; report templates
// (pick one to start from, save the text as one's own). With the server's
// report_signature on, signing asks the radiologist's certificate PIN in a
// dialog, and a signed report shows its digital signature (chữ ký số) as a badge.

import { api } from "./api.js";
import { acknowledgeCritical } from "./critical.js";
import { onLangChange, t } from "./i18n.js";
import { TEMPLATES_API, TemplatePicker } from "./templates.js";
import { formatDateTime, formatPN, h, readSession, toast, writeSession } from "./util.js";

// Only radiologists write and sign reports (the server enforces it too).
const EDITOR_ROLES = new Set(["radiologist"]);
const ACKNOWLEDGER_ROLES = new Set(["radiologist", "admin", "referring", "emr", "his"]);
export const UNSAVED_PREFIX = "pacs.unsaved.";

/** Forget every unsaved report text of this tab (explicit logout). */
export function forgetUnsaved() {
  try {
    for (const key of Object.keys(sessionStorage)) if (key.startsWith(UNSAVED_PREFIX)) sessionStorage.removeItem(key);
  } catch {
    /* storage disabled */
  }
}

export class ReportPanel {
  constructor(studyUid, user) {
    this.studyUid = studyUid;
    this.base = `/api/studies/${encodeURIComponent(studyUid)}/report`;
    this.canEdit = Boolean(user && EDITOR_ROLES.has(user.role));
    // Who records that a critical result was passed on (the server checks it too).
    this.canAcknowledge = Boolean(user && ACKNOWLEDGER_ROLES.has(user.role));
    this.username = user ? user.username : "";
    // Unsaved text survives a lost session (re-login comes back here) in this
    // tab's sessionStorage, for this user only; an explicit logout clears it.
    this.keepKey = `${UNSAVED_PREFIX}${studyUid}`;
    this.report = null;
    this.dirty = false;
    this.busy = false;
    // The study's modality and body part (setStudy): templates of those come first.
    this.modality = "";
    this.bodyPart = "";
    // The template (id, version) the text was last filled from, named with the next save (the audit trail).
    this.templateUsed = null;
    // Awaited before a signature: the key images being saved (study.js), which its PDF prints.
    this.beforeSign = null;
    // Told each status drawn ("signed" ends the reading claim: claim.js).
    this.onStatus = null;
    this.build();
  }

  build() {
    this.status = h("span#report-status.badge", { dataset: { status: "" } });
    this.version = h("span#report-version.muted");
    this.dirtyMark = h("span#report-dirty.dirty", { hidden: true, "data-i18n": "unsaved" });
    // The digital signature of the signed PDF, as the server verified it (GET .../report/signature).
    this.sigBadge = h("span#report-digital-signature.badge.sig-badge", { hidden: true });
    this.sigChecked = "";
    this.error = h("div#report-error.error", { role: "alert", hidden: true });
    this.notice = h("div#report-notice.muted", { hidden: true });
    // A colleague's save came first: the author's own text, to copy from.
    this.mine = h("textarea#report-mine", { readonly: true, spellcheck: "false" });
    this.mineBox = h("div#report-mine-box.report-mine", { hidden: true },
      h("label.report-label", { for: "report-mine", "data-i18n": "your_text" }), this.mine);
    this.findings = h("textarea#findings", { spellcheck: "false", readonly: true });
    this.impression = h("textarea#impression", { spellcheck: "false", readonly: true });
    this.meta = h("div#report-meta.report-meta");
    // A critical result (kết quả nguy kịch), flagged with the signature; once signed, its badge and who was told.
    this.criticalCheck = h("input#report-critical", { type: "checkbox" });
    this.criticalNote = h("input#report-critical-note",
      { type: "text", maxlength: "500", "data-i18n-placeholder": "critical_note_ph" });
    this.criticalBox = h("div#report-critical-box.report-critical", { hidden: true },
      h("label", this.criticalCheck, " ", h("span", { "data-i18n": "critical_flag" })), this.criticalNote);
    this.criticalBadge = h("span#report-critical-badge.badge.critical-badge", { hidden: true });
    this.ackButton = h("button#critical-ack.btn.small", { type: "button", "data-i18n": "critical_ack", hidden: true,
      onclick: () => this.acknowledge() });
    this.saveButton = h("button#save-report.btn", { type: "button", "data-i18n": "save_report", "data-i18n-title": "shortcuts_report", hidden: true, onclick: () => this.save() });
    this.signButton = h("button#sign-report.btn.primary", { type: "button", "data-i18n": "sign_report", hidden: true, onclick: () => this.sign() });
    this.amendButton = h("button#amend-report.btn", { type: "button", "data-i18n": "amend_report", hidden: true, onclick: () => this.amend() });
    this.pdfLink = h("a#report-pdf.btn", { href: `${this.base}/pdf`, target: "_blank", rel: "noopener", "data-i18n": "report_pdf", hidden: true });
    this.versionList = h("ol#report-version-list.versions");
    this.versions = h("details#report-versions", { hidden: true }, h("summary", { "data-i18n": "versions" }), this.versionList);
    this.picker = new TemplatePicker(this.username, (template) => this.applyTemplate(template));
    this.picker.element.hidden = true;
    this.saveTemplateButton = h("button#save-template.btn", { type: "button", "data-i18n": "save_template", hidden: true, onclick: () => this.saveAsTemplate() });

    this.element = h(
      "section#report-panel.report-panel",
      h("div.report-head", h("h2", { "data-i18n": "report" }), this.status, this.version, this.dirtyMark, this.sigBadge,
        this.criticalBadge, this.ackButton),
      this.error,
      this.notice,
      this.mineBox,
      this.picker.element,
      h("label.report-label", { for: "findings", "data-i18n": "findings" }),
      this.findings,
      h("label.report-label", { for: "impression", "data-i18n": "impression" }),
      this.impression,
      this.meta,
      this.criticalBox,
      h("div.report-actions", this.saveButton, this.signButton, this.amendButton, this.pdfLink, this.saveTemplateButton),
      this.versions,
    );

    for (const area of [this.findings, this.impression]) {
      area.addEventListener("input", () => {
        this.setDirty(true);
        this.keepUnsaved();
      });
    }
    this.onKey = (event) => {
      if ((event.ctrlKey || event.metaKey) && !event.altKey && event.key.toLowerCase() === "s") {
        event.preventDefault(); // never the browser's "save page"
        if (this.editable()) this.save();
      }
    };
    document.addEventListener("keydown", this.onKey);
    this.offLang = onLangChange(() => this.report && this.render(this.report, { keepText: true }));
  }

  destroy() {
    document.removeEventListener("keydown", this.onKey);
    this.offLang();
    this.picker.destroy();
  }

  /** The study's modality and body part (of its first image series): the picker offers their templates first. */
  setStudy(modality, bodyPart) {
    this.modality = modality || "";
    this.bodyPart = bodyPart || "";
    this.picker.setStudy(this.modality, this.bodyPart);
  }

  /** Fill the editor from *template*: an empty field is filled, typed text is
   * replaced only once the user agrees (nothing typed is lost unasked); a
   * field the template has no text for is left as it is. True when applied. */
  applyTemplate(template) {
    if (!this.editable()) return false;
    const fields = [[this.findings, template.findings || ""], [this.impression, template.impression || ""]];
    const replacing = fields.some(([area, text]) => text && area.value.trim() && area.value !== text);
    if (replacing && !confirm(t("template_replace_confirm", { name: template.name }))) return false;
    for (const [area, text] of fields) if (text) area.value = text;
    this.templateUsed = { id: template.id, version: template.version };
    this.setDirty(true);
    this.keepUnsaved();
    toast(t("template_applied", { name: template.name }));
    this.findings.focus();
    return true;
  }

  /** "Save as my template": the current text under a name the user gives,
   * with the study's modality and body part; the user's own template of that
   * name is replaced only once they agree. */
  async saveAsTemplate() {
    if (!this.canEdit) return;
    const findings = this.findings.value;
    const impression = this.impression.value;
    if (!findings.trim() && !impression.trim()) {
      toast(t("template_empty"), "error");
      return;
    }
    const name = (prompt(t("template_name_prompt")) || "").trim();
    if (!name) return;
    try {
      let done = t("template_saved", { name });
      try {
        await api("POST", TEMPLATES_API, { json: { name, findings, impression, modality: this.modality, body_part: this.bodyPart } });
      } catch (exc) {
        if (exc.status !== 409) throw exc;
        const mine = await this.picker.findMine(name);
        if (!mine) throw exc;
        if (!confirm(t("template_overwrite_confirm", { name: mine.name }))) return;
        await api("PUT", `${TEMPLATES_API}/${mine.id}`, { json: { version: mine.version, findings, impression } });
        done = t("template_replaced", { name: mine.name });
      }
      toast(done);
      this.picker.reload();
    } catch (exc) {
      if (exc.status !== 401) toast(exc.status !== 0 ? exc.message : t("network_error"), "error");
    }
  }

  editable() {
    return this.canEdit && this.report && this.report.status !== "signed" && !this.busy;
  }

  setDirty(dirty) {
    this.dirty = dirty;
    this.dirtyMark.hidden = !dirty;
  }

  revision() {
    return this.report && this.report.current && this.report.current.revision != null ? this.report.current.revision : 0;
  }

  keepUnsaved() {
    // Storage full or disabled: the beforeunload warning still protects.
    writeSession(this.keepKey, {
      user: this.username, revision: this.revision(), findings: this.findings.value, impression: this.impression.value,
    });
  }

  dropUnsaved() {
    writeSession(this.keepKey, null);
  }

  /** Text this user typed here before the session was lost: back into the
   * editor when nobody saved since, else beside the colleague's text. */
  restoreUnsaved() {
    const kept = readSession(this.keepKey);
    if (!kept || kept.user !== this.username || !this.editable()) return;
    if (kept.findings === this.findings.value && kept.impression === this.impression.value) {
      this.dropUnsaved();
      return;
    }
    if (kept.revision === this.revision()) {
      this.findings.value = kept.findings;
      this.impression.value = kept.impression;
      this.setDirty(true);
      toast(t("report_restored"));
    } else {
      this.showMine(kept.findings, kept.impression);
    }
  }

  showMine(findings, impression) {
    this.mine.value = [findings, impression].filter(Boolean).join("\n\n");
    this.mineBox.hidden = !this.mine.value;
    this.showError(t("report_conflict"));
  }

  showError(message) {
    this.error.textContent = message || "";
    this.error.hidden = !message;
  }

  async load() {
    this.showError("");
    try {
      this.render(await api("GET", this.base));
      this.restoreUnsaved();
    } catch (exc) {
      if (exc.status === 404 && exc.body && typeof exc.body === "object" && !exc.body.error) {
        // no report API yet / no report: start an empty draft
        this.render({ study_uid: this.studyUid, status: "none", current: null, versions: [] });
      } else if (exc.status !== 401) {
        this.render({ study_uid: this.studyUid, status: "none", current: null, versions: [] });
        this.showError(exc.message);
      }
    }
  }

  /** Draw `report`; keepText leaves unsaved edits in the textareas. */
  render(report, { keepText = false } = {}) {
    this.report = report;
    const status = report.status || (report.current ? report.current.status : "none") || "none";
    const current = report.current || null;
    const signed = status === "signed";

    this.status.textContent = t(`report_${signed ? "signed" : status === "draft" ? "draft" : "none"}`);
    this.status.dataset.status = status;
    this.status.className = `badge status-${status}`;
    if (this.onStatus) this.onStatus(status);
    this.version.textContent = current && current.version != null ? t("version", { v: current.version }) : "";

    const visibleText = this.canEdit || signed;
    if (!keepText) {
      this.findings.value = visibleText && current ? current.findings || "" : "";
      this.impression.value = visibleText && current ? current.impression || "" : "";
      this.setDirty(false);
    }
    const readOnly = !this.canEdit || signed;
    for (const area of [this.findings, this.impression]) {
      area.readOnly = readOnly;
      area.classList.toggle("readonly", readOnly);
    }

    this.notice.hidden = this.canEdit || signed;
    this.notice.textContent = this.notice.hidden ? "" : t("report_not_signed");

    let meta = "";
    if (current && signed && (current.signed_by || current.signed_at)) {
      meta = t("signed_by", { who: formatPN(current.signed_by) || current.author || "", when: formatDateTime(current.signed_at) });
    } else if (current && visibleText && (current.author || current.updated_at)) {
      meta = t("updated_by", { who: current.author || "", when: formatDateTime(current.updated_at) });
    }
    this.meta.textContent = meta;
    this.meta.id = signed ? "report-signed-info" : "report-meta";
    this.renderSignature(signed && current ? current : null);

    this.saveButton.hidden = !this.canEdit || signed;
    this.signButton.hidden = !this.canEdit || signed;
    this.criticalBox.hidden = !this.canEdit || signed;
    if (signed) { // kept across saves of the draft (a save redraws it); a new version starts unflagged
      this.criticalCheck.checked = false;
      this.criticalNote.value = "";
    }
    const critical = signed && current ? current.critical : null;
    this.criticalBadge.hidden = !critical;
    this.criticalBadge.textContent = critical ? t("critical_badge") : "";
    this.criticalBadge.title = !critical ? "" : [critical.note,
      critical.acknowledged_at ? t("critical_told", { who: critical.acknowledged_by, how: critical.acknowledgement })
        : t("critical_open")].filter(Boolean).join(" — ");
    this.ackButton.hidden = !(critical && !critical.acknowledged_at && this.canAcknowledge);
    this.amendButton.hidden = !this.canEdit || !signed;
    this.pdfLink.hidden = !signed;
    // Templates are for writing: a signed report is amended first.
    this.picker.element.hidden = !this.canEdit || signed;
    this.saveTemplateButton.hidden = !this.canEdit || signed;
    for (const button of [this.saveButton, this.signButton, this.amendButton]) button.disabled = this.busy;

    const versions = Array.isArray(report.versions) ? report.versions : [];
    this.versions.hidden = versions.length < 2;
    this.versionList.replaceChildren(
      ...versions.map((v) => {
        const who = formatPN(v.signed_by) || v.author || "";
        const when = formatDateTime(v.signed_at || v.updated_at);
        const key = v.status === "signed" ? "report_signed" : v.status === "draft" ? "report_draft" : "report_none";
        const text = [v.findings, v.impression].filter(Boolean).join("\n\n");
        return h("li", { title: text.slice(0, 500) }, `v${v.version ?? "?"} · ${t(key)} · ${who} · ${when}`);
      }),
    );
  }

  /** The digital signature badge of the signed version *current* (null: none
   * shown). Asked of the server once per signed PDF, only where the hospital
   * signs reports digitally (report_signature on). */
  async renderSignature(current) {
    const mode = this.report && this.report.digital_signature ? this.report.digital_signature.mode : "off";
    if (!current || !current.pdf_sop_uid || !mode || mode === "off") {
      this.sigBadge.hidden = true;
      this.sigChecked = "";
      return;
    }
    if (this.sigChecked === current.pdf_sop_uid && this.sigFound) {
      this.drawSignature(this.sigFound);
      return;
    }
    this.sigChecked = current.pdf_sop_uid;
    try {
      const found = await api("GET", `${this.base}/signature?version=${encodeURIComponent(current.version)}`);
      if (this.sigChecked !== current.pdf_sop_uid) return; // another version drawn meanwhile
      this.sigFound = found;
      this.drawSignature(found);
    } catch (exc) {
      this.sigBadge.hidden = true;
      this.sigFound = null;
    }
  }

  drawSignature(found) {
    const signatures = Array.isArray(found.signatures) ? found.signatures : [];
    if (!found.signed || !signatures.length) {
      this.sigBadge.hidden = true;
      return;
    }
    const who = signatures.map((s) => s.signer || s.name || "?").join(", ");
    const state = !found.intact ? "broken" : found.trusted ? "ok" : "untrusted";
    this.sigBadge.textContent = found.intact ? t("digital_signature_by", { who }) : t("digital_signature_broken");
    this.sigBadge.className = `badge sig-badge sig-${state}`;
    this.sigBadge.dataset.state = state;
    const lines = signatures.map((s) => t("digital_signature_detail", {
      who: s.signer_subject || s.signer || "", issuer: s.issuer || "", when: formatDateTime(s.signing_time),
    }));
    if (found.intact && !found.trusted) lines.push(t("digital_signature_untrusted"));
    this.sigBadge.title = lines.join("\n");
    this.sigBadge.hidden = false;
  }

  /** Ask the PIN of the radiologist's signing certificate in a modal dialog;
   * the PIN, or null when cancelled. The dialog is the signing confirmation too. */
  askPin() {
    return new Promise((resolve) => {
      const input = h("input#sign-pin", { type: "password", autocomplete: "off", required: true, maxlength: "256" });
      const cancel = h("button#sign-pin-cancel.btn", { type: "button", "data-i18n": "sign_pin_cancel" });
      const ok = h("button#sign-pin-ok.btn.primary", { type: "submit", "data-i18n": "sign_pin_ok" });
      const form = h("form.pin-form", { method: "dialog" },
        h("h3", { "data-i18n": "sign_pin_title" }),
        h("p.muted", { "data-i18n": "confirm_sign" }),
        h("label", { for: "sign-pin", "data-i18n": "sign_pin_label" }), input,
        h("div.report-actions", cancel, ok));
      const dialog = h("dialog#sign-pin-dialog.pin-dialog", { "aria-labelledby": "sign-pin-title" }, form);
      dialog.querySelector("h3").id = "sign-pin-title";
      for (const el of dialog.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
      let pin = null;
      form.addEventListener("submit", () => { pin = input.value; });
      cancel.addEventListener("click", () => dialog.close());
      dialog.addEventListener("close", () => {
        dialog.remove();
        input.value = ""; // the PIN leaves the page with the request that uses it
        resolve(pin);
      });
      document.body.append(dialog);
      dialog.showModal();
      input.focus();
    });
  }

  /** A PUT/POST answer is the report; if it does not look like one, fetch it. */
  async accept(response, options = {}) {
    if (response && typeof response === "object" && "status" in response && "current" in response) {
      this.render(response, options);
    } else {
      this.render(await api("GET", this.base), options);
    }
  }

  /** Run one report action; *lockText*: the editor takes no typing meanwhile
   * (a signature signs what was on screen when it was confirmed: text typed
   * while it is on its way would be neither signed nor kept). */
  async run(action, { lockText = false } = {}) {
    if (this.busy) return false;
    this.busy = true;
    if (lockText) for (const area of [this.findings, this.impression]) area.readOnly = true;
    this.element.setAttribute("aria-busy", "true");
    for (const button of [this.saveButton, this.signButton, this.amendButton]) button.disabled = true;
    this.showError("");
    try {
      await action();
      return true;
    } catch (exc) {
      if (exc.status === 409 && this.canEdit) {
        // Someone else saved, signed or amended first: show what is there now,
        // and the author's own text beside it (nothing is lost, nothing signed unseen).
        const findings = this.findings.value;
        const impression = this.impression.value;
        try {
          this.render(await api("GET", this.base));
        } catch {
          /* the message below still says what happened */
        }
        this.showMine(findings, impression);
      } else if (exc.status !== 401) {
        this.showError(exc.status !== 0 ? exc.message : t(exc.body && exc.body.timeout ? "network_timeout" : "network_error"));
      }
      return false;
    } finally {
      this.busy = false;
      this.element.removeAttribute("aria-busy");
      for (const button of [this.saveButton, this.signButton, this.amendButton]) button.disabled = false;
      if (lockText) {
        const readOnly = !this.canEdit || !this.report || this.report.status === "signed";
        for (const area of [this.findings, this.impression]) area.readOnly = readOnly;
      }
    }
  }

  async put() {
    const sent = { findings: this.findings.value, impression: this.impression.value };
    const template = this.templateUsed;
    const body = { ...sent, revision: this.revision() };
    if (template !== null) Object.assign(body, { template_id: template.id, template_version: template.version });
    const response = await api("PUT", this.base, { json: body });
    if (this.templateUsed === template) this.templateUsed = null; // named once, by the save that stored it
    // Typed while the save was on its way (Ctrl+S, then on typing over a slow
    // link): not in what was saved. It stays in the editor, unsaved and kept,
    // instead of being replaced by the saved text without a word.
    const typed = this.findings.value !== sent.findings || this.impression.value !== sent.impression;
    this.mineBox.hidden = true;
    await this.accept(response, { keepText: typed });
    if (typed) {
      this.setDirty(true);
      this.keepUnsaved(); // with the revision just saved: a lost session brings it back into the editor
    } else {
      this.dropUnsaved();
    }
  }

  async save() {
    if (!this.editable()) return;
    if (await this.run(() => this.put())) toast(t("saved"));
  }

  async sign() {
    if (!this.editable()) return;
    if (!this.findings.value.trim() && !this.impression.value.trim()) {
      // The server refuses an empty report (422), but only after the empty
      // draft was saved: the study then read "draft" with nothing written.
      toast(t("report_empty"), "error");
      this.findings.focus();
      return;
    }
    const signing = this.report.digital_signature || {};
    let pin = null;
    if (signing.pin_required) {
      pin = await this.askPin();
      if (!pin) return;
    } else if (!confirm(t("confirm_sign"))) {
      return;
    }
    const ok = await this.run(async () => {
      if (this.beforeSign) await this.beforeSign();
      if (this.dirty || !this.report.current) await this.put();
      const body = { revision: this.revision() };
      if (pin) body.pin = pin;
      if (this.criticalCheck.checked) Object.assign(body, { critical: true, critical_note: this.criticalNote.value });
      await this.accept(await api("POST", `${this.base}/sign`, { json: body }));
    }, { lockText: true });
    if (ok) toast(t("signed_ok"));
  }

  /** Record who was told of the critical result, and how (critical.js, as from the list of critical results). */
  async acknowledge() {
    // Not this.run(): its 409 is a colleague's save of the text; here it is
    // someone who acknowledged first, whose record the redraw shows.
    await acknowledgeCritical(this.studyUid);
    try {
      await this.accept(null);
    } catch {
      /* the badge keeps what it showed */
    }
  }

  async amend() {
    if (!this.canEdit || !this.report || this.report.status !== "signed") return;
    // A new version cannot be taken back: a stray click left every signed
    // study it hit a "draft" on the worklist until someone signed it again.
    if (!confirm(t("confirm_amend"))) return;
    const ok = await this.run(async () => this.accept(await api("POST", `${this.base}/amend`)));
    if (ok) this.findings.focus();
  }
}
