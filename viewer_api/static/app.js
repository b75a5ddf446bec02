// The web viewer's entry point: session, top bar and hash routing
// (#/login, #/worklist, #/study/<StudyInstanceUID>, #/accession/<AccessionNumber>,
// #/activity for administrators, #/critical for those who list critical results).

import { mountActivity } from "./activity.js";
import { api, setToken, setUnauthorizedHandler } from "./api.js";
import { CRITICAL_LISTERS, mountCritical, refreshCriticalCount, showCriticalCount } from "./critical.js";
import { applyI18n, onLangChange, t, toggleLang } from "./i18n.js";
import { mountLogin } from "./login.js";
import { forgetUnsaved } from "./report.js";
import { mountStudy } from "./study.js";
import { formatDate, formatPN, h, toast } from "./util.js";
import { mountWorklist, showUrgent } from "./worklist.js";

const NEXT_KEY = "pacs.next";

const state = {
  user: null,
  view: null, // {cleanup(), canLeave()} of the mounted screen
  hash: "",
  ignoreHash: false,
};

const root = document.getElementById("app");

// -- top bar -------------------------------------------------------------------------
function buildTopbar() {
  const bar = document.getElementById("topbar");
  bar.replaceChildren(
    h("a.brand", { href: "#/worklist", "data-i18n": "app_title" }),
    h("a#nav-worklist.nav", { href: "#/worklist", "data-i18n": "nav_worklist" }),
    h("a#nav-activity.nav", { href: "#/activity", "data-i18n": "nav_activity", hidden: true }),
    // The open critical results' count beside it (critical.js).
    h("a#nav-critical.nav", { href: "#/critical", hidden: true },
      h("span", { "data-i18n": "nav_critical" }), " ", h("span#critical-count.badge.critical-count", { hidden: true })),
    // Urgent studies not yet read, as the last worklist load counted them (worklist.js).
    h("button#urgent-count.btn.small.urgent-count", {
      type: "button", hidden: true, "data-i18n-title": "urgent_count_title",
      onclick: () => {
        showUrgent();
        navigate("#/worklist");
      },
    }),
    h("span.spacer"),
    h("span#current-user", { title: "" }),
    h("button#lang-toggle.btn.small", {
      type: "button",
      "data-i18n": "lang_toggle",
      "data-i18n-title": "lang_toggle_title",
      onclick: () => toggleLang(),
    }),
    h("button#logout-button.btn.small", { type: "button", "data-i18n": "logout", onclick: logout }),
  );
  applyI18n(bar);
  updateTopbar();
}

function updateTopbar() {
  const user = state.user;
  document.body.classList.toggle("signed-in", Boolean(user));
  const who = document.getElementById("current-user");
  if (who) {
    who.textContent = user ? formatPN(user.display_name) || user.username : "";
    who.title = user ? `${user.username} (${user.role})` : "";
  }
  const activity = document.getElementById("nav-activity");
  if (activity) activity.hidden = !(user && user.role === "admin");
  const critical = document.getElementById("nav-critical");
  if (critical) {
    const shown = Boolean(user && CRITICAL_LISTERS.has(user.role));
    if (shown && critical.hidden) countCritical(); // signed in: counted now, not a minute later
    critical.hidden = !shown;
    if (!shown) showCriticalCount(0); // the next user's count is their own
  }
  const urgent = document.getElementById("urgent-count");
  if (urgent) {
    const n = user ? Number(urgent.dataset.count || 0) : 0;
    urgent.hidden = !(n > 0);
    urgent.textContent = n > 0 ? t("urgent_count", { n }) : "";
    if (!user) urgent.dataset.count = "0"; // the next user's worklist counts their own
  }
}

// The open critical results' count, every CRITICAL_POLL_MS while the app is open and shown: one small
// request (the total only), or the critical screen's own refresh, which counts them too.
const CRITICAL_POLL_MS = 60000;

function countCritical(unattended = false) {
  if (state.view && state.view.refresh && parseRoute(state.hash).name === "critical") state.view.refresh();
  else refreshCriticalCount({ unattended }).catch(() => {}); // the badge keeps its count until the next one
}

setInterval(() => {
  const user = state.user;
  if (document.hidden || !user || !CRITICAL_LISTERS.has(user.role)) return;
  countCritical(true);
}, CRITICAL_POLL_MS);

async function logout() {
  if (state.view && state.view.canLeave && !state.view.canLeave() && !confirm(t("confirm_leave"))) return;
  forgetUnsaved(); // the next user of this browser tab sees none of it
  try {
    await api("POST", "/api/auth/logout", { auth401: false });
  } catch {
    /* the session is dropped locally anyway */
  }
  setToken(null);
  state.user = null;
  updateTopbar();
  if (state.view && state.view.cleanup) state.view.cleanup();
  state.view = null;
  sessionStorage.removeItem(NEXT_KEY);
  forgetSearches();
  navigate("#/login");
}

// The worklist's search and the place in each study (this tab's memory):
// the next user of the tab must not find the previous one's patient search run.
function forgetSearches() {
  try {
    for (const key of Object.keys(sessionStorage)) {
      if (key === "pacs.worklist" || key.startsWith("pacs.view.")) sessionStorage.removeItem(key);
    }
  } catch {
    /* storage disabled */
  }
}

// -- routing -------------------------------------------------------------------------
function parseRoute(hash) {
  const parts = hash.replace(/^#\/?/, "").split("/");
  const name = parts[0] || "";
  if (name === "login") return { name: "login" };
  if (name === "worklist") return { name: "worklist" };
  if (name === "activity") return { name: "activity" };
  if (name === "critical") return { name: "critical" };
  if (name === "study" && parts[1]) return { name: "study", studyUid: decoded(parts[1]) };
  if (name === "accession" && parts[1]) return { name: "accession", accession: decoded(parts[1]) };
  return { name: "" };
}

// A link cut inside a %-escape ("%E0%A4%A", pasted from a chat) threw
// URIError: the address changed and the old screen stayed, without a word.
// Kept as written, it is a study or accession nobody has: the view says so.
function decoded(part) {
  try {
    return decodeURIComponent(part);
  } catch {
    return part;
  }
}

function navigate(hash, replace = false) {
  if (location.hash === hash) {
    render();
  } else if (replace) {
    location.replace(hash);
  } else {
    location.hash = hash;
  }
}

function render() {
  const hash = location.hash || "#/";
  const route = parseRoute(hash);
  if (!state.user && route.name !== "login") {
    if (route.name) sessionStorage.setItem(NEXT_KEY, hash);
    navigate("#/login", true);
    return;
  }
  if (state.user && (route.name === "login" || route.name === "")) {
    navigate("#/worklist", true);
    return;
  }
  if (state.view && state.view.cleanup) state.view.cleanup();
  state.view = null;
  state.hash = hash;
  root.replaceChildren();
  document.body.dataset.screen = route.name;
  const ctx = {
    user: state.user,
    setUser(user) {
      state.user = user;
      updateTopbar();
    },
    navigate,
    afterLogin() {
      const next = sessionStorage.getItem(NEXT_KEY);
      sessionStorage.removeItem(NEXT_KEY);
      navigate(next && parseRoute(next).name && parseRoute(next).name !== "login" ? next : "#/worklist");
    },
  };
  if (route.name === "login") state.view = mountLogin(root, ctx);
  else if (route.name === "worklist") state.view = mountWorklist(root, ctx);
  else if (route.name === "activity") state.view = mountActivity(root, ctx);
  else if (route.name === "critical") state.view = mountCritical(root, ctx);
  else if (route.name === "study") state.view = mountStudy(root, ctx, route.studyUid);
  else if (route.name === "accession") state.view = openAccession(root, ctx, route.accession);
  applyI18n(root);
}

// An EMR link by accession number (/viewer/accession/<n>): resolved only now,
// after login, through the worklist with the user's own access rights.
function openAccession(el, ctx, accession) {
  const controller = new AbortController();
  const message = h("p#accession-message.notice", { "data-i18n": "loading" });
  el.append(message);
  const say = (text) => {
    message.removeAttribute("data-i18n"); // no longer "loading": a language switch must not bring it back
    message.textContent = text;
  };
  const notFound = () => say(t("accession_not_found").replace("{accession}", accession));
  // The link names one accession exactly: a wildcard would open whichever
  // patient came first (the search API matches * and ?).
  if (!accession || /[*?\\]/.test(accession)) {
    notFound();
    return { cleanup: () => controller.abort() };
  }
  api("GET", "/api/worklist", { query: { accession, limit: 20 }, signal: controller.signal })
    .then((data) => {
      const found = ((data && data.items) || []).filter((item) => item.accession === accession);
      if (found.length === 1) {
        ctx.navigate(`#/study/${encodeURIComponent(found[0].study_uid)}`, true);
      } else if (found.length > 1) {
        // Two studies under one accession (a repeat, a merge): the user chooses, never the first.
        say(t("accession_many").replace("{accession}", accession));
        el.append(h("ul#accession-choices", ...found.map((item) => h("li", h("a", {
          href: `#/study/${encodeURIComponent(item.study_uid)}` },
          [formatPN(item.patient_name), item.patient_id, formatDate(item.study_date), item.modalities, item.description]
            .filter(Boolean).join(" · "))))));
      } else notFound();
    })
    .catch((exc) => {
      if (exc && exc.name === "AbortError") return;
      say(exc && exc.message ? exc.message : String(exc));
    });
  return { cleanup: () => controller.abort() };
}

window.addEventListener("hashchange", () => {
  if (state.ignoreHash) {
    state.ignoreHash = false;
    return;
  }
  const view = state.view;
  if (view && view.canLeave && !view.canLeave()) {
    if (!confirm(t("confirm_leave"))) {
      state.ignoreHash = true;
      location.hash = state.hash;
      return;
    }
    if (view.discard) view.discard();
  }
  render();
});

window.addEventListener("beforeunload", (event) => {
  if (state.view && state.view.canLeave && !state.view.canLeave()) {
    event.preventDefault();
    event.returnValue = "";
  }
});

setUnauthorizedHandler(() => {
  const wasSignedIn = Boolean(state.user);
  state.user = null;
  setToken(null);
  updateTopbar();
  if (parseRoute(location.hash).name !== "login") {
    if (wasSignedIn) toast(t("session_expired"), "error");
    if (state.view && state.view.cleanup) state.view.cleanup();
    state.view = null; // unsaved work cannot be saved without a session anyway
    sessionStorage.setItem(NEXT_KEY, location.hash);
    navigate("#/login");
  }
});

onLangChange(() => updateTopbar());

// -- start-up ------------------------------------------------------------------------
// The signed-in user, or null. Only a 401/403 ends the session: a server busy
// or restarting (503, no answer) dropped the token, and everyone had to log
// in again after a restart. It is said, and asked again until it answers.
async function whoAmI() {
  for (;;) {
    try {
      const me = await api("GET", "/api/me", { auth401: false });
      const user = me && (me.user || me);
      return user && user.username ? user : null;
    } catch (exc) {
      if (exc.status === 401 || exc.status === 403) {
        setToken(null);
        return null;
      }
      toast(exc.status ? exc.message : t("http_502"), "error");
      await new Promise((resolve) => setTimeout(resolve, ME_RETRY_MS));
    }
  }
}
const ME_RETRY_MS = 3000;

async function start() {
  buildTopbar();
  state.user = await whoAmI();
  updateTopbar();
  document.body.classList.add("ready");
  render();
}

start();
