// The login screen: POST /api/auth/login, keep the token for fetch() calls.

import { api, setToken } from "./api.js";
import { t } from "./i18n.js";
import { h } from "./util.js";

export function mountLogin(root, ctx) {
  const username = h("input#username", {
    name: "username", type: "text", autocomplete: "username", required: true, autocapitalize: "off", spellcheck: "false",
  });
  const password = h("input#password", { name: "password", type: "password", autocomplete: "current-password", required: true });
  const error = h("div#login-error.error", { role: "alert", hidden: true });
  const button = h("button#login-button.btn.primary", { type: "submit", "data-i18n": "login_button" });

  const form = h(
    "form#login-form.card.login",
    { novalidate: true },
    h("h1", { "data-i18n": "login_title" }),
    h("label", { for: "username", "data-i18n": "username" }),
    username,
    h("label", { for: "password", "data-i18n": "password" }),
    password,
    error,
    button,
  );

  function showError(message) {
    error.textContent = message;
    error.hidden = false;
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!username.value.trim()) return username.focus();
    if (!password.value) return password.focus();
    button.disabled = true;
    error.hidden = true;
    try {
      const res = await api("POST", "/api/auth/login", {
        json: { username: username.value.trim(), password: password.value },
        auth401: false,
      });
      setToken(res && res.token);
      ctx.setUser(res && res.user);
      ctx.afterLogin();
    } catch (exc) {
      // 401: the server says only that the pair is wrong (no user enumeration), in English.
      showError(exc.status === 401 ? `${t("login_failed")}: ${t("wrong_credentials")}`
        : exc.message ? `${t("login_failed")}: ${exc.message}` : t("login_failed"));
      password.select();
      password.focus();
    } finally {
      button.disabled = false;
    }
  });

  root.append(h("div.login-wrap", form));
  queueMicrotask(() => username.focus());
  return { cleanup() {} };
}
