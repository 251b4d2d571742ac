// Keyboard-first review: each key posts one review and swaps in the next alert's panel (no page reload).
// No inline script anywhere: the page's CSP allows scripts from this origin only.
(function () {
  "use strict";
  const reviewed = [];  // alert ids reviewed from this page, newest last: what "undo" walks back

  function panel() { return document.getElementById("alert-panel"); }
  function csrf() { return document.querySelector('meta[name="csrf-token"]').content; }
  function say(text) { const s = document.getElementById("status"); if (s) { s.textContent = text; } }

  async function swap(response) {
    const text = await response.text();
    if (!response.ok) { say(text); return false; }
    document.getElementById("panel").innerHTML = text;
    return true;
  }

  async function post(alertId, action, label) {
    const p = panel();
    const body = new URLSearchParams(p.dataset.query);
    body.set("action", action);
    if (label) { body.set("new_label", label); }
    if (action !== "undo") { body.set("expected_count", p.dataset.count); }
    const response = await fetch("/alerts/" + encodeURIComponent(alertId) + "/review", {
      method: "POST", body: body, credentials: "same-origin",
      headers: { "X-CSRF-Token": csrf(), "Content-Type": "application/x-www-form-urlencoded" },
    });
    return swap(response);
  }

  let busy = false;
  async function act(button) {
    if (busy) { return; }
    const p = panel();
    const alertId = p ? p.dataset.alert : "";
    const action = button.dataset.action;
    busy = true;
    try {
      if (action === "skip") {
        const query = new URLSearchParams(p.dataset.query);
        query.set("after", alertId);
        if (await swap(await fetch("/review/panel?" + query.toString(), { credentials: "same-origin" }))) {
          say("skipped " + alertId);
        }
      } else if (action === "undo-last") {
        const target = reviewed.length ? reviewed[reviewed.length - 1] : alertId;
        if (target && await post(target, "undo")) {
          if (reviewed.length) { reviewed.pop(); }
          say("undid the last review of " + target);
        }
      } else if (alertId) {
        if (await post(alertId, action, button.dataset.label)) {
          reviewed.push(alertId);
          say(action.replace("_", " ") + (button.dataset.label ? " as " + button.dataset.label : "") + ": " + alertId);
        }
      }
    } finally {
      busy = false;
    }
  }

  document.addEventListener("click", function (event) {
    const button = event.target.closest("#alert-panel button[data-action]");
    if (button) { event.preventDefault(); act(button); }
  });

  document.addEventListener("keydown", function (event) {
    if (!document.getElementById("panel")) { return; }
    if (event.ctrlKey || event.metaKey || event.altKey) { return; }
    const tag = (event.target.tagName || "").toLowerCase();
    if (tag === "input" || tag === "textarea" || tag === "select") { return; }
    if (event.key === "o") {
      const overlay = document.getElementById("overlay");
      if (overlay) { overlay.classList.toggle("hidden"); }
      return;
    }
    const p = panel();
    if (!p) { return; }
    const button = p.querySelector('button[data-key="' + CSS.escape(event.key) + '"]');
    if (button) { event.preventDefault(); act(button); }
  });
})();
