// The dashboard's only script (vendored, no framework): shows the result of a write that
// redirected back with ?done=..., asks before a revoke, and makes "back" links go back (the
// Content-Security-Policy allows no inline script or javascript: URLs).
(function () {
  var params = new URLSearchParams(window.location.search);
  var done = params.get("done");
  if (done) {
    var main = document.querySelector("main");
    var note = document.createElement("div");
    note.className = "notice ok";
    note.id = "done";
    note.textContent = done;
    main.insertBefore(note, main.firstChild);
  }
  document.querySelectorAll("form[data-confirm]").forEach(function (form) {
    form.addEventListener("submit", function (event) {
      if (!window.confirm(form.getAttribute("data-confirm"))) { event.preventDefault(); }
    });
  });
  document.querySelectorAll("a[data-back]").forEach(function (link) {
    link.addEventListener("click", function (event) {
      if (window.history.length > 1) { event.preventDefault(); window.history.back(); }
    });
  });
})();
