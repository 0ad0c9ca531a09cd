// The finding view's in-page viewer (issue #23): NiiVue, vendored and served by the app
// (/static/niivue/), fed the de-identified volume and the finding's mask as NIfTI by the app's
// audited routes. Served as a file and loaded as an ES module: the Content-Security-Policy
// allows no inline script and no eval. The mask is NiiVue's drawing layer, so a reviewer with
// the "correct" permission edits it (brush / erase) and saves it back (POST /correction,
// gzipped NIfTI, CSRF token in a header). window.pacsflowViewer exposes the state for tests.
const el = document.getElementById("nv");
const $ = (id) => document.getElementById(id);
const status = (text) => { $("nv-status").textContent = text; };
const api = { ready: false, error: null, loadMs: null, moduleMs: null, nv: null };
window.pacsflowViewer = api;

async function main() {
  const t0 = performance.now();
  const { Niivue, SLICE_TYPE } = await import(el.dataset.module);
  const t1 = performance.now();
  const presets = JSON.parse(el.dataset.presets || "{}");
  const shape = el.dataset.shape.split(",").map(Number); // slices, rows, columns
  const nv = new Niivue({
    backColor: [0, 0, 0, 1],
    isRadiologicalConvention: true, // patient's left on the image's right
    isOrientationTextVisible: true,
    dragAndDropEnabled: false,
    show3Dcrosshair: false,
    crosshairColor: [1, 0.85, 0, 0.8],
    logLevel: "error",
  });
  api.nv = nv;
  await nv.attachToCanvas($("nv-canvas"));
  nv.setSliceType(SLICE_TYPE.MULTIPLANAR);
  await nv.loadVolumes([{ url: el.dataset.volume, name: "volume.nii", colormap: "gray" }]);
  const maskUrl = el.dataset.correction || el.dataset.mask;
  if (maskUrl) {
    await nv.loadDrawingFromUrl(maskUrl);
  } else {
    nv.createEmptyDrawing();
  }
  api.loadMs = performance.now() - t1;
  api.moduleMs = t1 - t0;

  const vol = nv.volumes[0];
  function applyWindow(name) {
    const p = presets[name];
    if (p) {
      vol.cal_min = p[0] - p[1] / 2;
      vol.cal_max = p[0] + p[1] / 2;
    } else {
      vol.cal_min = vol.robust_min;
      vol.cal_max = vol.robust_max;
    }
    nv.updateGLVolume();
  }
  function applyMask() {
    const mode = $("nv-mask-mode").value, op = Number($("nv-opacity").value);
    if (mode === "off") { nv.drawOpacity = 0; nv.drawRimOpacity = -1; }
    else if (mode === "outline") { nv.drawOpacity = 0.01; nv.drawRimOpacity = Math.max(op, 0.5); }
    else { nv.drawOpacity = op; nv.drawRimOpacity = -1; }
    nv.drawScene();
  }
  function centre() {
    const c = el.dataset.centre;
    if (c) {
      nv.scene.crosshairPos = nv.mm2frac(c.split(",").map(Number));
    } else {
      nv.scene.crosshairPos = [0.5, 0.5, 0.5];
    }
    nv.drawScene();
    nv.createOnLocationChange();
  }
  // slice numbers from 1, in the stored array's axes (slice, row, column)
  nv.onLocationChange = (data) => {
    const v = data.vox || [0, 0, 0];
    $("nv-pos").textContent = `slice ${v[2] + 1} / ${shape[0]} · row ${v[1] + 1} / ${shape[1]}` +
      ` · column ${v[0] + 1} / ${shape[2]}`;
    api.vox = v;
  };
  const layouts = { axial: SLICE_TYPE.AXIAL, coronal: SLICE_TYPE.CORONAL,
    sagittal: SLICE_TYPE.SAGITTAL, multiplanar: SLICE_TYPE.MULTIPLANAR };
  $("nv-layout").addEventListener("change", (e) => nv.setSliceType(layouts[e.target.value]));
  $("nv-window").addEventListener("change", (e) => applyWindow(e.target.value));
  $("nv-mask-mode").addEventListener("change", applyMask);
  $("nv-opacity").addEventListener("input", applyMask);
  $("nv-centre").addEventListener("click", centre);
  // left drag: crosshair (8), window/level (9) or pan (3; the wheel then zooms)
  $("nv-drag").addEventListener("change", (e) => { nv.opts.dragModePrimary = Number(e.target.value); });
  function zoom(f) {
    const p = nv.scene.pan2Dxyzmm;
    nv.setPan2Dxyzmm([p[0], p[1], p[2], Math.min(Math.max(p[3] * f, 0.5), 16)]);
  }
  $("nv-zoom-in").addEventListener("click", () => zoom(1.25));
  $("nv-zoom-out").addEventListener("click", () => zoom(0.8));
  $("nv-reset").addEventListener("click", () => { nv.setPan2Dxyzmm([0, 0, 0, 1]); centre(); });

  if ($("nv-save")) {
    const pen = (value) => {
      nv.setDrawingEnabled(true);
      nv.setPenValue(value, false);
      status(value ? "brush: drag to add to the mask" : "erase: drag to remove from the mask");
    };
    $("nv-brush").addEventListener("click", () => pen(1));
    $("nv-erase").addEventListener("click", () => pen(0));
    $("nv-view").addEventListener("click", () => { nv.setDrawingEnabled(false); status(""); });
    $("nv-undo").addEventListener("click", () => nv.drawUndo());
    $("nv-save").addEventListener("click", () => api.save().then(
      (r) => status(`correction saved (${r.voxel_count} voxels)`),
      (err) => status(`not saved: ${err.message}`)));
  }

  // save the drawing as the finding's corrected mask: NIfTI in the volume's own voxel order
  api.save = async function () {
    const nii = await nv.saveImage({ filename: "", isSaveDrawing: true });
    if (!nii) throw new Error("no drawing to save");
    const gz = await new Response(
      new Blob([nii]).stream().pipeThrough(new CompressionStream("gzip"))).arrayBuffer();
    const r = await fetch(el.dataset.save, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/octet-stream", "X-CSRF-Token": el.dataset.csrf },
      body: gz,
    });
    const text = await r.text();
    if (!r.ok) throw new Error(text);
    return JSON.parse(text);
  };
  api.applyWindow = applyWindow;
  api.applyMask = applyMask;
  api.centre = centre;
  applyWindow($("nv-window").value);
  applyMask();
  centre();
  api.ready = true;
  status("");
}

main().catch((err) => {
  api.error = String(err && err.message ? err.message : err);
  status(`viewer unavailable: ${api.error}`);
});
