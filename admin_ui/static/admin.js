// swf-engine admin: every button with data-api calls the REST API with the session's CSRF token.
// data-method (default POST), data-body (JSON), data-body-text (id of a textarea -> {"text": ...}),
// data-body-ids (checkbox name -> {"ids": [...]}), data-confirm, data-then: reload | goto:URL | goto-message | report.
(function () {
  "use strict";
  function csrf() {
    var meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.content : "";
  }
  function flash(text, bad) {
    var box = document.getElementById("flash");
    if (!box) return;
    box.textContent = text;
    box.className = bad ? "bad" : "good";
  }
  async function call(url, method, body) {
    var options = {method: method, headers: {"X-CSRF-Token": csrf()}, credentials: "same-origin"};
    if (body !== undefined) {
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    var response = await fetch(url, options);
    var data = null;
    try { data = await response.json(); } catch (e) { data = null; }
    if (!response.ok) {
      var detail = data && data.detail !== undefined ? data.detail : response.statusText;
      throw new Error(response.status + ": " + (typeof detail === "string" ? detail : JSON.stringify(detail)));
    }
    return data;
  }
  function bodyOf(el) {
    if (el.dataset.body) return JSON.parse(el.dataset.body);
    if (el.dataset.bodyText) return {text: document.getElementById(el.dataset.bodyText).value};
    if (el.dataset.bodyIds) {
      var ids = Array.from(document.querySelectorAll('input[name="' + el.dataset.bodyIds + '"]:checked'))
        .map(function (box) { return parseInt(box.value, 10); });
      return {ids: ids};
    }
    return undefined;
  }
  async function act(el) {
    if (el.dataset.confirm && !window.confirm(el.dataset.confirm)) return;
    el.disabled = true;
    try {
      var data = await call(el.dataset.api, el.dataset.method || "POST", bodyOf(el));
      var then = el.dataset.then || "reload";
      if (then === "reload") { flash("done"); window.location.reload(); }
      else if (then.indexOf("goto:") === 0) { window.location.href = then.slice(5); }
      else if (then === "goto-message" && data && data.message_id) { window.location.href = "/ui/messages/" + data.message_id; }
      else if (then === "report") { document.getElementById("report").textContent = JSON.stringify(data, null, 2); flash("done"); }
      else { flash(JSON.stringify(data)); }
    } catch (error) {
      flash(error.message, true);
    } finally {
      el.disabled = false;
    }
  }
  document.addEventListener("click", function (event) {
    var el = event.target.closest("[data-api]");
    if (el && el.tagName !== "FORM") { event.preventDefault(); act(el); return; }
    var toggle = event.target.closest("[data-toggle]");
    if (toggle) { var box = document.getElementById(toggle.dataset.toggle); box.hidden = !box.hidden; return; }
    var all = event.target.closest("[data-check-all]");
    if (all) {
      document.querySelectorAll('input[name="' + all.dataset.checkAll + '"]').forEach(function (box) { box.checked = all.checked; });
    }
  });
  document.addEventListener("submit", function (event) {
    var form = event.target.closest("form[data-api-form]");
    if (!form) return;
    event.preventDefault();
    var body = {};
    new FormData(form).forEach(function (value, key) { body[key] = value; });
    call(form.dataset.apiForm, "POST", body).then(function () { window.location.reload(); },
                                                 function (error) { flash(error.message, true); });
  });
  // dashboard: refresh the counts in place from /api/dashboard
  var table = document.getElementById("channels");
  if (table) {
    setInterval(async function () {
      var box = document.getElementById("autorefresh");
      if (box && !box.checked) return;
      try {
        var channels = await call("/api/dashboard", "GET");
        channels.forEach(function (c) {
          var row = table.querySelector('tr[data-channel="' + c.name + '"]');
          if (!row) return;
          ["received", "filtered", "queued", "retrying", "sent", "last_hour"].forEach(function (field) {
            var cell = row.querySelector('[data-field="' + field + '"]');
            if (cell) cell.textContent = c[field];
          });
          ["errored", "dead"].forEach(function (field) {
            var cell = row.querySelector('[data-field="' + field + '"]');
            if (cell && cell.textContent.trim() !== String(c[field])) {
              var link = field === "dead" ? "/ui/dead-letters?channel=" : "/ui/messages?status=error&channel=";
              cell.innerHTML = c[field] ? '<a href="' + link + encodeURIComponent(c.name) + '">' + c[field] + "</a>" : "0";
            }
          });
          var state = row.querySelector('[data-field="state"]');
          if (state) { state.textContent = c.state; state.className = "state " + c.state; }
        });
      } catch (e) { /* the next round tries again */ }
    }, 5000);
  }
})();
