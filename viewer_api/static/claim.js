// Who is reading a study ("đang đọc"): a radiologist who opens a study whose
// report is not signed claims it (POST /api/studies/{uid}/claim) and the
// viewer keeps the claim alive while the study stays open (a heartbeat, as
// often as the server says); colleagues see the name in their worklist. One's
// own claim is a small item of the study's header ("Bạn đang đọc", Release);
// a colleague's is a banner above the images, with a button to take the study
// over (the server audits it, and the colleague's viewer says
// so at its next heartbeat). The claim ends at the signature, on "Release",
// or once the heartbeats stop for the server's reading_claim_minutes.

import { api } from "./api.js";
import { onLangChange, t } from "./i18n.js";
import { formatPN, formatTime, h } from "./util.js";

const CLAIMERS = new Set(["radiologist", "admin"]);
// Who claims a study by opening it: the radiologists (an administrator presses "Claim").
const AUTO_CLAIM = new Set(["radiologist"]);

/** "BS. Trần Văn An" for a claim's holder (their display name, else their user name). */
export function claimName(claim) {
  return formatPN(claim.display_name) || claim.user || "";
}

export class ReadingClaim {
  constructor(studyUid, user) {
    this.path = `/api/studies/${encodeURIComponent(studyUid)}/claim`;
    this.canClaim = Boolean(user && CLAIMERS.has(user.role));
    this.auto = Boolean(user && AUTO_CLAIM.has(user.role));
    this.claim = null; // the running claim as the server last said it
    this.status = ""; // the report's status ("signed": nothing to read)
    this.lost = false; // a colleague took it over from this viewer
    this.timer = 0;
    this.destroyed = false;
    // A colleague's claim: a banner above the images, with "take over".
    this.text = h("span#claim-text.claim-text");
    this.takeOverButton = button("claim-take-over", "claim_take_over", () => this.take(true));
    this.takeOverButton.classList.add("danger");
    this.element = h("div#claim-banner.claim-banner", { role: "status", hidden: true }, this.text, this.takeOverButton);
    // One's own claim, or none: a small item of the study's header (the images keep their room).
    this.state = h("span#claim-state.claim-state");
    this.claimButton = button("claim-button", "claim_button", () => this.take(false));
    this.releaseButton = button("claim-release", "claim_release", () => this.release());
    this.chip = h("span#claim-chip.hitem.claim-chip", { hidden: true },
      this.state, this.claimButton, this.releaseButton);
    this.offLang = onLangChange(() => this.render());
  }

  destroy() {
    this.destroyed = true;
    this.stop();
    this.offLang();
  }

  /** The study's report status and claim as GET /api/studies/{uid} gave them. */
  start(study) {
    this.claim = study.claim || null;
    this.status = study.report_status || "";
    if (this.auto && this.readable() && (!this.claim || this.claim.mine)) this.take(false);
    else if (this.claim && this.claim.mine) this.beat();
    this.render();
  }

  /** The report panel's status changed (signed: the server ended the claim; amended: readable again). */
  reportStatus(status) {
    const was = this.status;
    this.status = status;
    if (status === "signed") {
      this.stop();
      this.claim = null;
    } else if (was === "signed" && this.auto && !this.claim) {
      this.take(false);
    }
    this.render();
  }

  readable() {
    return this.canClaim && this.status !== "signed";
  }

  async take(takeOver) {
    if (!this.readable()) return;
    try {
      // A take-over names the colleague shown: a claim passed to another meanwhile is refused (409, named).
      const holder = takeOver && this.claim && !this.claim.mine ? this.claim.user || "" : "";
      this.apply(await api("POST", this.path, { json: { take_over: takeOver, holder } }));
      this.lost = false;
    } catch (exc) {
      this.refused(exc);
    }
    this.render();
  }

  async release() {
    this.stop();
    try {
      await api("DELETE", this.path);
      this.claim = null;
    } catch (exc) {
      this.refused(exc);
    }
    this.render();
  }

  apply(claim) {
    if (this.destroyed) return;
    this.claim = claim;
    this.every = Math.max(1, Number(claim.refresh_seconds) || 60) * 1000;
    this.beat();
  }

  /** A 409 names the colleague's claim (or says the report is signed); other errors leave things as they were. */
  refused(exc) {
    if (exc.status !== 409) return;
    this.stop();
    const holder = exc.body && exc.body.claim;
    this.lost = Boolean(holder && this.claim && this.claim.mine);
    this.claim = holder || null;
  }

  beat() {
    this.stop();
    if (this.destroyed) return;
    this.timer = setInterval(() => this.heartbeat(), this.every || 60000);
  }

  stop() {
    clearInterval(this.timer);
    this.timer = 0;
  }

  async heartbeat() {
    try {
      // Not a take-over, nor a new claim: a colleague who took it over keeps it, a release stays released.
      const claim = await api("POST", this.path, { json: { take_over: false, refresh: true } });
      if (!this.destroyed) this.claim = claim;
    } catch (exc) {
      this.refused(exc);
      this.render();
    }
  }

  render() {
    const claim = this.claim;
    const mine = Boolean(claim && claim.mine);
    const other = Boolean(claim && !claim.mine);
    const readable = this.readable();
    this.element.hidden = !this.canClaim || !other;
    if (other) {
      const name = claimName(claim);
      this.text.textContent = this.lost ? t("claim_lost", { name })
        : t("claim_other", { name, since: formatTime(localTime(claim.since)) });
    }
    this.takeOverButton.hidden = !readable;
    this.chip.hidden = !readable || other;
    this.chip.dataset.state = mine ? "mine" : "free";
    this.chip.title = mine ? t("claim_mine") : t("claim_free");
    this.state.textContent = mine ? t("claim_by_me") : "";
    this.state.hidden = !mine;
    this.claimButton.hidden = mine;
    this.releaseButton.hidden = !mine;
  }
}

/** A small button labelled *key* (its title *key*_title), in the language shown now and after a switch. */
function button(id, key, onclick) {
  return h(`button#${id}.btn.small`, {
    type: "button", "data-i18n": key, "data-i18n-title": `${key}_title`, title: t(`${key}_title`), onclick,
  }, t(key));
}

/** An ISO instant as the local "HHMM" a DICOM TM formatter reads. */
function localTime(iso) {
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return "";
  return `${String(d.getHours()).padStart(2, "0")}${String(d.getMinutes()).padStart(2, "0")}`;
}
