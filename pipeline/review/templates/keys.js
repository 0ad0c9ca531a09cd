// Keyboard decisions on the finding page (issue #23): A / R / U press the accept / reject /
// uncertain button (the same CSRF-protected POST as a click; "save and next" follows), N / P
// open the next / previous finding of the list. Keys typed into a field are left alone.
// Served as a file: the Content-Security-Policy allows no inline script.
(function () {
  var decisions = { a: "decide-accept", r: "decide-reject", u: "decide-uncertain" };
  var links = { n: "nav-next", p: "nav-prev" };
  var busy = false;
  document.addEventListener("keydown", function (e) {
    var t = e.target, tag = t && t.tagName;
    if (e.ctrlKey || e.metaKey || e.altKey || e.repeat || busy) return;
    if (tag === "TEXTAREA" || tag === "SELECT" || (t && t.isContentEditable) ||
        (tag === "INPUT" && t.type !== "range" && t.type !== "checkbox")) return;
    var key = (e.key || "").toLowerCase(), el;
    if (decisions[key] && (el = document.getElementById(decisions[key]))) {
      busy = true;  // one decision per page: a held or repeated key sends one POST
      e.preventDefault();
      el.click();
    } else if (links[key] && (el = document.getElementById(links[key]))) {
      e.preventDefault();
      window.location.assign(el.getAttribute("href"));
    }
  });
})();
