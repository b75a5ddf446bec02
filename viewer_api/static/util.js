// Small helpers: element builder, DICOM value formatting, toasts.

import { getLang, t } from "./i18n.js";

/**
 * h("button#id.cls", {attrs...}, children...) -> HTMLElement.
 * attrs: "on<event>" functions become listeners, "dataset" an object,
 * booleans toggle attributes, "style" is set through CSSOM (the page's
 * Content-Security-Policy refuses style attributes), everything else is
 * setAttribute().
 */
export function h(spec, attrs, ...children) {
  const m = /^([a-z0-9-]+)?(?:#([\w-]+))?((?:\.[\w-]+)*)$/i.exec(spec);
  const el = document.createElement((m && m[1]) || "div");
  if (m && m[2]) el.id = m[2];
  if (m && m[3]) el.className = m[3].slice(1).split(".").join(" ");
  if (attrs && (typeof attrs !== "object" || attrs instanceof Node || Array.isArray(attrs))) {
    children.unshift(attrs);
    attrs = null;
  }
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") {
      el.addEventListener(key.slice(2).toLowerCase(), value);
    } else if (key === "dataset") {
      Object.assign(el.dataset, value);
    } else if (key === "text") {
      el.textContent = value;
    } else if (key === "value") {
      el.value = value;
    } else if (key === "style") {
      el.style.cssText = String(value);
    } else {
      el.setAttribute(key, value === true ? "" : String(value));
    }
  }
  appendAll(el, children);
  return el;
}

function appendAll(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) appendAll(el, child);
    else el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** DICOM PN "Nguyễn^Văn An" -> "Nguyễn Văn An" (first, alphabetic, group only). */
export function formatPN(pn) {
  if (!pn) return "";
  if (typeof pn === "object") pn = pn.Alphabetic || pn.Ideographic || "";
  const [family = "", given = "", middle = "", prefix = "", suffix = ""] = String(pn).split("=")[0].split("^");
  return [prefix, family, given, middle, suffix]
    .map((s) => s.trim())
    .filter(Boolean)
    .join(" ")
    .replace(/\s+/g, " ");
}

/** DICOM DA "20240131" -> "31/01/2024" (vi) or "2024-01-31" (en). */
export function formatDate(da) {
  const m = /^(\d{4})-?(\d{2})-?(\d{2})/.exec(String(da || ""));
  if (!m) return da || "";
  return getLang() === "vi" ? `${m[3]}/${m[2]}/${m[1]}` : `${m[1]}-${m[2]}-${m[3]}`;
}

/** DICOM TM "143005.123" -> "14:30". */
export function formatTime(tm) {
  const m = /^(\d{2}):?(\d{2})/.exec(String(tm || ""));
  return m ? `${m[1]}:${m[2]}` : "";
}

/** An ISO timestamp in the local time zone, in the UI language. */
export function formatDateTime(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return String(iso);
  return d.toLocaleString(getLang() === "vi" ? "vi-VN" : "en-GB", {
    year: "numeric", month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit",
  });
}

/** "YYYY-MM-DD" (an <input type=date> value) -> "YYYYMMDD". */
export function toDicomDate(value) {
  return (value || "").replace(/-/g, "");
}

export function sexLabel(sex) {
  const s = String(sex || "").toUpperCase();
  return s === "M" || s === "F" || s === "O" ? t(`sex_${s}`) : s;
}

/** A list value (array or "CT\\SR") as "CT, SR". */
export function listText(value) {
  if (Array.isArray(value)) return value.join(", ");
  return String(value || "").split("\\").filter(Boolean).join(", ");
}

let toastTimer = 0;

/** A short message at the bottom of the screen; kind is "info" or "error". */
export function toast(message, kind = "info") {
  const el = document.getElementById("toast");
  if (!el) return;
  el.textContent = message;
  el.className = `toast show ${kind}`;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => (el.className = "toast"), kind === "error" ? 6000 : 2500);
}

/** True when a key event comes from a place where typing is expected. */
export function isTyping(event) {
  const el = event.target;
  if (!(el instanceof HTMLElement)) return false;
  if (el.isContentEditable) return true;
  const tag = el.tagName;
  if (tag === "TEXTAREA" || tag === "SELECT") return true;
  if (tag === "INPUT") return !["button", "checkbox", "radio", "submit", "range"].includes(el.type);
  return false;
}

/** A JSON value kept in this tab's sessionStorage; null when absent or unreadable. */
export function readSession(key) {
  try {
    return JSON.parse(sessionStorage.getItem(key) || "null");
  } catch {
    return null;
  }
}

/** Keep *value* (as JSON) under *key* in this tab; null removes it. A storage
 * that is disabled or full is ignored: what it keeps is a convenience. */
export function writeSession(key, value) {
  try {
    if (value === null) sessionStorage.removeItem(key);
    else sessionStorage.setItem(key, JSON.stringify(value));
  } catch {
    /* disabled or full */
  }
}

// A screen's load that failed, said in its message line (an aborted one says nothing: the screen was left).
export function showFailure(message, exc) {
  if (exc && exc.name === "AbortError") return;
  message.classList.add("error");
  message.textContent = exc && exc.message ? exc.message : String(exc);
}
