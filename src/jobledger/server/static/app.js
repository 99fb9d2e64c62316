// jobledger dashboard: refreshes the page body in place, and "select all" for bulk actions.
// No framework; the server renders (and escapes) everything.
(function () {
  "use strict";
  var body = document.body;
  var seconds = parseFloat(body.getAttribute("data-refresh") || "5");
  var toggle = document.getElementById("auto-refresh");
  if (toggle && window.localStorage) {
    toggle.checked = localStorage.getItem("jobledger.refresh") !== "off";
    toggle.addEventListener("change", function () {
      localStorage.setItem("jobledger.refresh", toggle.checked ? "on" : "off");
    });
  }

  function busy() {
    // Never refresh under a person's hands: a focused field or a ticked box would be lost.
    var main = document.getElementById("content");
    if (!main) return true;
    var active = document.activeElement;
    if (active && main.contains(active) && /INPUT|SELECT|TEXTAREA|BUTTON/.test(active.tagName)) return true;
    return main.querySelector("input[name=ids]:checked, details[open] input") !== null;
  }

  function refresh() {
    if (document.hidden || (toggle && !toggle.checked) || busy() || document.querySelector("form[method=post]#confirm-form")) return;
    fetch(window.location.href, { credentials: "same-origin", headers: { "X-Refresh": "1" } })
      .then(function (r) { return r.ok && !r.redirected ? r.text() : null; })
      .then(function (html) {
        if (html === null || busy()) return;
        var fresh = new DOMParser().parseFromString(html, "text/html").getElementById("content");
        var main = document.getElementById("content");
        if (fresh && main) main.replaceChildren.apply(main, Array.prototype.slice.call(fresh.childNodes));
        wire();
      })
      .catch(function () { /* the next tick tries again */ });
  }

  function wire() {
    var all = document.getElementById("select-all");
    if (all && !all.dataset.wired) {
      all.dataset.wired = "1";
      all.addEventListener("change", function () {
        document.querySelectorAll("input[name=ids]").forEach(function (box) { box.checked = all.checked; });
      });
    }
  }

  wire();
  if (seconds > 0) window.setInterval(refresh, seconds * 1000);
})();
