// The finding view's slice slider, window, overlay and arrow keys (served as a file: the
// Content-Security-Policy allows no inline script).
(function () {
  var img = document.getElementById("slice"), k = document.getElementById("k"),
      w = document.getElementById("w"), ov = document.getElementById("overlay"),
      op = document.getElementById("opacity"), lab = document.getElementById("k-label");
  function update() {
    lab.textContent = +k.value + 1;  // slices are numbered from 1 on the page
    img.src = img.dataset.base + "&k=" + k.value + "&w=" + encodeURIComponent(w.value) +
      "&overlay=" + (ov.checked ? 1 : 0) + "&opacity=" + op.value;
  }
  [k, op].forEach(function (el) { el.addEventListener("input", update); });
  [w, ov].forEach(function (el) { el.addEventListener("change", update); });
  document.addEventListener("keydown", function (e) {
    if (e.target.tagName === "INPUT" && e.target.type !== "range") return;
    if (e.key === "ArrowUp" || e.key === "ArrowRight") { k.value = Math.min(+k.value + 1, +k.max); update(); }
    if (e.key === "ArrowDown" || e.key === "ArrowLeft") { k.value = Math.max(+k.value - 1, 0); update(); }
  });
})();
