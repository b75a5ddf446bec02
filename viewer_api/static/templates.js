// The report template picker ("mẫu kết quả") of the report panel: the user's
// own and the department's templates, those of the study's modality and body
// part first, searched on the server by name without diacritics ("sieu am"
// finds "Siêu âm"). Choosing one hands it to onPick; the report panel decides
// what to fill (and asks before replacing typed text).

import { api } from "./api.js";
import { t } from "./i18n.js";
import { h } from "./util.js";

export const TEMPLATES_API = "/api/report-templates";
const SEARCH_DELAY_MS = 250;

/** A template name as the server compares names: case and spacing ignored, diacritics kept. */
export function nameKey(name) {
  return String(name || "").normalize("NFC").toLowerCase().split(/\s+/).filter(Boolean).join(" ");
}

export class TemplatePicker {
  /** onPick(template) is called with the template chosen. */
  constructor(username, onPick) {
    this.username = username;
    this.onPick = onPick;
    this.modality = "";
    this.bodyPart = "";
    this.loaded = false;
    this.items = [];
    this.shown = null; // the search (study and typed text) the items answer
    this.sequence = 0; // answers of an older search are ignored
    this.timer = 0;

    this.search = h("input#template-search", {
      type: "search", autocomplete: "off", spellcheck: "false",
      "data-i18n-placeholder": "template_search_ph", placeholder: t("template_search_ph"),
      "aria-controls": "template-list",
    });
    this.list = h("ul#template-list.template-list", { role: "listbox", "data-i18n-aria": "templates" });
    this.message = h("div#template-message.muted", { hidden: true });
    this.summary = h("summary#template-summary", { "data-i18n": "templates" }, t("templates"));
    this.element = h("details#template-picker.template-picker", this.summary, this.search, this.message, this.list);

    this.element.addEventListener("keydown", (event) => {
      // Escape closes the list; the study's own Escape (back to the worklist) is not this one.
      if (event.key === "Escape" && this.element.open) {
        event.preventDefault();
        this.element.open = false;
        this.summary.focus();
      }
    });
    this.element.addEventListener("toggle", () => {
      if (this.element.open && !this.loaded) this.load();
      if (this.element.open) this.search.focus({ preventScroll: true });
    });
    this.search.addEventListener("input", () => {
      clearTimeout(this.timer);
      this.timer = setTimeout(() => this.load(), SEARCH_DELAY_MS);
    });
    this.search.addEventListener("keydown", (event) => {
      if (event.key === "Enter") {
        // The first one listed: the best fit for the study among those matching.
        event.preventDefault();
        this.pickFirst();
      } else if (event.key === "ArrowDown") {
        const first = this.list.querySelector("button");
        if (first) {
          event.preventDefault();
          first.focus();
        }
      }
    });
  }

  /** The study's modality and body part, offered first; a loaded list is asked again. */
  setStudy(modality, bodyPart) {
    this.modality = modality || "";
    this.bodyPart = bodyPart || "";
    // Opened before the study was known, its first search (without the
    // modality) may still be on its way: ask again, the older answer is ignored.
    if (this.loaded || this.element.open) this.load();
  }

  /** Ask the server again (after "save as my template"). */
  reload() {
    if (this.loaded || this.element.open) this.load();
  }

  destroy() {
    clearTimeout(this.timer);
    this.sequence += 1;
  }

  say(message) {
    this.message.textContent = message || "";
    this.message.hidden = !message;
  }

  /** The search the picker would send now. */
  wanted() {
    return { modality: this.modality, body_part: this.bodyPart, q: this.search.value.trim() };
  }

  /** Enter in the search: the first template matching what is typed. The
   * list shown may still answer the text typed before (the search waits for
   * a pause in typing, then for the server): picking from it filled the
   * report from a template the radiologist had not searched for. */
  async pickFirst() {
    const wanted = JSON.stringify(this.wanted());
    if (this.shown !== wanted) await this.load();
    if (this.shown === wanted && JSON.stringify(this.wanted()) === wanted && this.items.length) {
      this.pick(this.items[0]);
    }
  }

  async load() {
    clearTimeout(this.timer);
    const sequence = ++this.sequence;
    const query = this.wanted();
    this.element.setAttribute("aria-busy", "true");
    try {
      const data = await api("GET", TEMPLATES_API, { query });
      if (sequence !== this.sequence) return;
      this.loaded = true;
      this.shown = JSON.stringify(query);
      this.items = (data && Array.isArray(data.items)) ? data.items : [];
      this.render();
    } catch (exc) {
      if (sequence !== this.sequence || exc.status === 401) return;
      this.shown = null;
      this.items = [];
      this.list.replaceChildren();
      this.say(`${t("template_load_error")}: ${exc.message}`);
    } finally {
      if (sequence === this.sequence) this.element.removeAttribute("aria-busy");
    }
  }

  render() {
    this.say(this.items.length ? "" : t("template_none"));
    this.list.replaceChildren(...this.items.map((template) => this.item(template)));
  }

  item(template) {
    const whose = template.owner === "" ? "template_shared" : template.owner === this.username ? "template_mine" : "";
    const codes = [template.modality, template.body_part].filter(Boolean).join(" · ");
    const button = h(
      "button.template-item",
      {
        type: "button",
        role: "option",
        "data-testid": "template-item",
        dataset: { templateId: String(template.id), fits: template.fits || "" },
        title: [template.findings, template.impression].filter(Boolean).join("\n\n").slice(0, 600),
        onclick: () => this.pick(template),
      },
      h("span.template-name", template.name),
      h("span.template-meta", codes, whose ? h("span.template-owner", { "data-i18n": whose }, t(whose)) : template.owner),
    );
    button.addEventListener("keydown", (event) => {
      const to = event.key === "ArrowDown" ? button.parentElement.nextElementSibling
        : event.key === "ArrowUp" ? button.parentElement.previousElementSibling : null;
      if (event.key === "ArrowUp" && !to) {
        event.preventDefault();
        this.search.focus();
      } else if (to) {
        event.preventDefault();
        to.querySelector("button").focus();
      }
    });
    return h("li", button);
  }

  pick(template) {
    if (this.onPick(template)) this.element.open = false;
  }

  /** The user's own template of this name (case and spacing ignored), from the server; null if none. */
  async findMine(name) {
    const data = await api("GET", TEMPLATES_API, { query: { q: name, limit: 500 } });
    const key = nameKey(name);
    return ((data && data.items) || []).find((i) => i.owner === this.username && nameKey(i.name) === key) || null;
  }
}
