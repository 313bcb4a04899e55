// portico console: replaces the server-rendered snapshot with each newer one the server sends
// (server-sent events). Read-only: it only listens.
(function () {
  "use strict";
  var live = document.getElementById("live");
  var conn = document.getElementById("conn");
  if (!window.EventSource || !live) { return; }
  var es = new EventSource("console/stream");
  es.addEventListener("snapshot", function (e) {
    live.innerHTML = e.data;
    conn.textContent = "live " + new Date().toISOString().slice(11, 19);
    conn.className = "live";
    document.body.setAttribute("data-updated", String(Date.now()));
  });
  es.onerror = function () { conn.textContent = "reconnecting"; conn.className = "lost"; };
})();
