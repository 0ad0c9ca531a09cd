// The finding view's in-page viewer (issue #23): NiiVue, vendored and served by the app
// (/static/niivue/), fed the de-identified volume and the finding's mask as NIfTI by the app's
// audited routes. Served as a file and loaded as an ES module: the Content-Security-Policy
// allows no inline script and no eval. The mask is NiiVue's drawing layer, so a reviewer with
// the "correct" permission edits it (brush / erase) and saves it back (POST /correction,
// gzipped NIfTI, CSRF token in a header). window.pacsflowViewer exposes the state for tests.
const el = document.getElementById("nv");
const $ = (id) => document.getElementById(id);
const status = (text) => { $("nv-status").textContent = text; };
// timings: ms since the navigation began (performance.now()'s origin) at each step; when the
// first frame with volume and mask is on screen, #nv gets data-loaded="<ms>" (benchmarks, tests)
const api = { ready: false, error: null, loadMs: null, moduleMs: null, nv: null, timings: {} };
window.pacsflowViewer = api;
const mark = (name) => { api.timings[name] = Math.round(performance.now()); };

// A volume over this many voxels is shown first as a preview (every n-th voxel along each axis,
// n chosen to stay under it), then swapped for the full one: with WebGL on the CPU (SwiftShader,
// headless) NiiVue's passes over a 512x512x300 CT take tens of seconds; on a GPU, milliseconds.
const PREVIEW_VOXELS = 2 ** 21;

// fetch a NIfTI route as bytes (the volume every `step`-th voxel when step > 1)
async function bytes(url, step) {
  const r = await fetch(step > 1 ? `${url}&step=${step}` : url, { credentials: "same-origin" });
  if (!r.ok) throw new Error(`${r.status} ${await r.text()}`);
  return r.arrayBuffer();
}

async function main() {
  const t0 = performance.now();
  mark("start");
  const presets = JSON.parse(el.dataset.presets || "{}");
  const shape = el.dataset.shape.split(",").map(Number); // slices, rows, columns
  const voxels = shape[0] * shape[1] * shape[2];
  const step = voxels > PREVIEW_VOXELS ? Math.ceil(Math.cbrt(voxels / PREVIEW_VOXELS)) : 1;
  const maskUrl = el.dataset.correction || el.dataset.mask;
  // the downloads start now, while the module loads: the preview's (when any) first
  const first = [bytes(el.dataset.volume, step), maskUrl ? bytes(maskUrl, step) : null];
  const full = step === 1 ? first : [null, null];
  const fetchFull = () => {
    full[0] = bytes(el.dataset.volume, 1);
    full[1] = maskUrl ? bytes(maskUrl, 1) : null;
  };
  if (step > 1) Promise.all(first).then(fetchFull, fetchFull);
  first.forEach((p) => p && p.catch(() => {})); // a failure is reported where awaited
  const { Niivue, NVImage, SLICE_TYPE, SHOW_RENDER } = await import(el.dataset.module);
  const t1 = performance.now();
  mark("module");
  const nv = new Niivue({
    backColor: [0, 0, 0, 1],
    isRadiologicalConvention: true, // patient's left on the image's right
    isOrientationTextVisible: true,
    dragAndDropEnabled: false,
    show3Dcrosshair: false,
    crosshairColor: [1, 0.85, 0, 0.8],
    multiplanarShowRender: SHOW_RENDER.NEVER, // three planes; the 3-D render is a layout
    logLevel: "error",
  });
  api.nv = nv;
  await nv.attachToCanvas($("nv-canvas"));
  nv.setSliceType(SLICE_TYPE.MULTIPLANAR);
  mark("attached");
  // the first window is set before the upload (no second pass, no histogram of the volume)
  const preset = presets[$("nv-window").value];
  let cal = preset ? [preset[0] - preset[1] / 2, preset[0] + preset[1] / 2] : [NaN, NaN];
  async function show(volumeBytes, maskBytes, what) {
    const img = await NVImage.new(await volumeBytes, "volume.nii", "gray", 1, null, cal[0], cal[1]);
    cal = [img.cal_min, img.cal_max]; // "auto": the preview's range serves the full volume
    nv.drawBitmap = null;
    nv.volumes = [];
    nv.addVolume(img);
    mark(`${what}volume`);
    if (maskBytes) {
      // the app's mask has the volume's geometry (same dims, affine): its voxels go to the
      // drawing layer as they are, without a second NIfTI parse and range scan
      const buf = await maskBytes;
      const head = new DataView(buf, 0, 352);
      const dims = [1, 2, 3].map((d) => head.getInt16(40 + 2 * d, true));
      if (head.getInt16(70, true) !== 2 || dims.some((v, d) => v !== img.hdr.dims[d + 1])) {
        throw new Error("the mask is not an 8-bit image of the volume's shape");
      }
      const voxels = new Uint8Array(buf, head.getFloat32(108, true), dims[0] * dims[1] * dims[2]);
      nv.loadDrawing({ hdr: img.hdr, img: voxels, permRAS: img.permRAS });
    } else {
      nv.createEmptyDrawing();
    }
    mark(`${what}mask`);
  }
  await show(first[0], first[1], step > 1 ? "preview-" : "");
  api.loadMs = performance.now() - t1;
  api.moduleMs = t1 - t0;
  function applyWindow(name) {
    const vol = nv.volumes[0], p = presets[name];
    if (p) {
      cal = [p[0] - p[1] / 2, p[0] + p[1] / 2];
    } else {
      if (preset) { // the volume came with a preset's range: compute its own now
        vol.hdr.cal_min = NaN;
        vol.hdr.cal_max = NaN;
        vol.calMinMax();
      }
      cal = [vol.robust_min, vol.robust_max];
    }
    if (vol.cal_min === cal[0] && vol.cal_max === cal[1]) return;
    vol.cal_min = cal[0];
    vol.cal_max = cal[1];
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
    sagittal: SLICE_TYPE.SAGITTAL, multiplanar: SLICE_TYPE.MULTIPLANAR, "3-D": SLICE_TYPE.RENDER };
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
  // a frame on screen: the next animation frame, once the GPU has done all it was asked
  // (reading one pixel waits for it; WebGL calls only queue work)
  const frame = () => new Promise((resolve) => requestAnimationFrame(() => {
    nv.gl.readPixels(0, 0, 1, 1, nv.gl.RGBA, nv.gl.UNSIGNED_BYTE, new Uint8Array(4));
    resolve();
  }));
  applyMask();
  centre();
  await frame();
  if (step > 1) { // the preview is on screen: now the full volume (no drawing until then)
    mark("preview");
    el.dataset.preview = String(api.timings.preview);
    for (const id of ["nv-brush", "nv-erase", "nv-save"]) if ($(id)) $(id).disabled = true;
    status(`preview (every ${step}th voxel); loading the full volume…`);
    await show(full[0], full[1], "");
    for (const id of ["nv-brush", "nv-erase", "nv-save"]) if ($(id)) $(id).disabled = false;
    applyWindow($("nv-window").value);
    applyMask();
    centre();
    await frame();
  }
  mark("frame");
  api.ready = true;
  el.dataset.loaded = String(api.timings.frame);
  status("");
}

main().catch((err) => {
  api.error = String(err && err.message ? err.message : err);
  status(`viewer unavailable: ${api.error}`);
});
