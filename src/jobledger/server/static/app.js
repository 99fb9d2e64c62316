// jobledger dashboard: refreshes the page body in place when it changed, shows times as ages,
// sorts tables, loads cut arguments on request, and "select all" for bulk actions.
// No framework; the server renders (and escapes) everything; text set here uses textContent.
(function () {
  "use strict";
  var body = document.body;
  var seconds = parseFloat(body.getAttribute("data-refresh") || "5");
  var toggle = document.getElementById("auto-refresh");
  // The ledger's clock minus the browser's: ages are measured on the ledger's clock.
  var skew = clockSkew(body.getAttribute("data-now"));
  var etag = null;
  if (toggle && window.localStorage) {
    toggle.checked = localStorage.getItem("jobledger.refresh") !== "off";
    toggle.addEventListener("change", function () {
      localStorage.setItem("jobledger.refresh", toggle.checked ? "on" : "off");
    });
  }

  function clockSkew(ledgerNow) {
    var now = parseFloat(ledgerNow || "");
    return isNaN(now) ? 0 : now - Date.now() / 1000;
  }

  function busy() {
    // Never refresh under a person's hands: a focused field or a ticked box would be lost.
    var main = document.getElementById("content");
    if (!main) return true;
    var active = document.activeElement;
    if (active && main.contains(active) && /INPUT|SELECT|TEXTAREA|BUTTON|SUMMARY/.test(active.tagName)) return true;
    return main.querySelector("input[name=ids]:checked, details[open], #args.loaded") !== null;
  }

  function refresh() {
    if (document.hidden || (toggle && !toggle.checked) || busy() || document.querySelector("form[method=post]#confirm-form")) return;
    var headers = { "X-Refresh": "1" };
    if (etag) headers["If-None-Match"] = etag;
    // no-store: the browser neither answers from its cache nor hides a 304 from us
    fetch(window.location.href, { credentials: "same-origin", cache: "no-store", headers: headers })
      .then(function (r) {
        if (r.headers.get("X-Ledger-Now")) skew = clockSkew(r.headers.get("X-Ledger-Now"));
        if (r.status === 304 || !r.ok || r.redirected) return null;
        etag = r.headers.get("ETag");
        return r.text();
      })
      .then(function (html) {
        if (html !== null && !busy()) {
          var fresh = new DOMParser().parseFromString(html, "text/html").getElementById("content");
          var main = document.getElementById("content");
          if (fresh && main) main.replaceChildren.apply(main, Array.prototype.slice.call(fresh.childNodes));
          wire();
        }
        ages();
      })
      .catch(function () { /* the next tick tries again */ });
  }

  function format(s) {
    // as the server's format_seconds: 850ms, 42s, 12m5s, 3h2m, 4d3h
    if (s < 1) return Math.round(s * 1000) + "ms";
    if (s < 10) return s.toFixed(1) + "s";
    if (s < 60) return Math.round(s) + "s";
    var whole = Math.floor(s);
    var units = [["d", 86400, "h", 3600], ["h", 3600, "m", 60]];
    for (var i = 0; i < units.length; i++) {
      var u = units[i];
      if (whole >= u[1]) {
        var rest = Math.floor((whole % u[1]) / u[3]);
        return Math.floor(whole / u[1]) + u[0] + (rest ? rest + u[2] : "");
      }
    }
    var m = Math.floor(whole / 60), sec = whole % 60;
    return m + "m" + (sec ? sec + "s" : "");
  }

  function ages() {
    var now = Date.now() / 1000 + skew;
    document.querySelectorAll("time.age[data-at]").forEach(function (el) {
      var age = Math.max(0, now - parseFloat(el.getAttribute("data-at")));
      el.textContent = format(age) + (el.getAttribute("data-suffix") || "");
    });
  }

  // -- sorting: by a column's data-v (or its text); remembered per page across refreshes
  function sortKey(table) { return "jobledger.sort." + window.location.pathname + "#" + table.id; }

  function cellValue(row, index, numeric) {
    var cell = row.cells[index];
    if (!cell) return numeric ? -Infinity : "";
    var raw = cell.hasAttribute("data-v") ? cell.getAttribute("data-v") : cell.textContent.trim();
    if (!numeric) return raw.toLowerCase();
    var n = parseFloat(raw);
    return isNaN(n) ? -Infinity : n;
  }

  function applySort(table, index, descending) {
    var th = table.tHead.rows[0].cells[index];
    if (!th) return;
    var numeric = th.getAttribute("data-sort") === "num";
    var tbody = table.tBodies[0];
    var rows = Array.prototype.slice.call(tbody.rows).filter(function (r) { return r.cells.length > 1; });
    rows.sort(function (a, b) {
      var x = cellValue(a, index, numeric), y = cellValue(b, index, numeric);
      var order = x < y ? -1 : x > y ? 1 : 0;
      return descending ? -order : order;
    });
    rows.forEach(function (r) { tbody.appendChild(r); });
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (cell) { cell.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", descending ? "descending" : "ascending");
  }

  function wireSorting(table) {
    var saved = window.sessionStorage && sessionStorage.getItem(sortKey(table));
    if (saved) {
      var parts = saved.split(":");
      applySort(table, parseInt(parts[0], 10), parts[1] === "desc");
    }
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, index) {
      if (!th.hasAttribute("data-sort")) return;
      th.tabIndex = 0;
      th.title = "sort";
      var sort = function () {
        var descending = th.getAttribute("aria-sort") === "ascending";
        applySort(table, index, descending);
        if (window.sessionStorage) sessionStorage.setItem(sortKey(table), index + ":" + (descending ? "desc" : "asc"));
      };
      th.addEventListener("click", sort);
      th.addEventListener("keydown", function (e) { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sort(); } });
    });
  }

  function wireArguments(button) {
    button.addEventListener("click", function () {
      button.disabled = true;
      button.textContent = "Loading…";
      fetch(button.getAttribute("data-url"), { credentials: "same-origin", headers: { Accept: "application/json" } })
        .then(function (r) { if (!r.ok) throw new Error(r.status + " " + r.statusText); return r.json(); })
        .then(function (data) {
          var pre = document.getElementById("args");
          pre.textContent = JSON.stringify(data, null, 2);
          pre.classList.add("loaded");  // a refresh would cut it again: pause refreshing
          button.remove();
        })
        .catch(function (err) { button.disabled = false; button.textContent = "Could not load (" + err.message + "): try again"; });
    });
  }

  function wire() {
    var all = document.getElementById("select-all");
    if (all && !all.dataset.wired) {
      all.dataset.wired = "1";
      all.addEventListener("change", function () {
        document.querySelectorAll("input[name=ids]").forEach(function (box) { box.checked = all.checked; });
      });
    }
    document.querySelectorAll("table.sortable").forEach(function (table) {
      if (!table.dataset.wired) { table.dataset.wired = "1"; wireSorting(table); }
    });
    var load = document.getElementById("load-args");
    if (load && !load.dataset.wired) { load.dataset.wired = "1"; wireArguments(load); }
    ages();
  }

  wire();
  if (seconds > 0) window.setInterval(refresh, seconds * 1000);
  window.setInterval(ages, 1000);
})();
