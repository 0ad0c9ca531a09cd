// The finding view's in-page viewer (issue #23), two renderers behind the same controls:
// - NiiVue, vendored and served by the app (/static/niivue/), fed the de-identified volume and
//   the finding's mask as NIfTI by the app's audited routes: the 3-D render, and the mask as
//   NiiVue's drawing layer, so a reviewer with the "correct" permission edits it (brush /
//   erase) and saves it back (POST /correction, gzipped NIfTI, CSRF token in a header);
// - the slice viewer (slices.js, the 2-D canvas): three planes from the first six small
//   requests, then the whole volume in memory. It is the default where WebGL runs on the CPU
//   (SwiftShader, llvmpipe: NiiVue's passes over a 512x512x300 CT take over a minute there)
//   or is missing; choosing the 3-D layout or a drawing tool switches to NiiVue.
// `?viewer=niivue` or `?viewer=slices` in the page's address picks one. Served as files and
// loaded as ES modules: the Content-Security-Policy allows no inline script and no eval.
// window.pacsflowViewer exposes the state for tests and benchmarks.
const el = document.getElementById("nv");
const $ = (id) => document.getElementById(id);
const status = (text) => { $("nv-status").textContent = text; };
// timings: ms since the navigation began (performance.now()'s origin) at each step; when the
// first frame with volume and mask is on screen, #nv gets data-first="<ms>"; when the whole
// volume and mask are, data-loaded="<ms>" (benchmarks, tests)
const api = { ready: false, error: null, loadMs: null, moduleMs: null, nv: null, slices: null,
  renderer: null, timings: {} };
window.pacsflowViewer = api;
const mark = (name) => { api.timings[name] = Math.round(performance.now()); };
mark("script");
const shape = el.dataset.shape.split(",").map(Number); // slices, rows, columns
const presets = JSON.parse(el.dataset.presets || "{}");
const maskUrl = el.dataset.correction || el.dataset.mask;
const posText = (v) => `slice ${v[2] + 1} / ${shape[0]} · row ${v[1] + 1} / ${shape[1]}` +
  ` · column ${v[0] + 1} / ${shape[2]}`;
const editIds = ["nv-brush", "nv-erase", "nv-undo", "nv-view", "nv-save"];

// A volume over this many voxels is shown first as a preview (every n-th voxel along each axis,
// n chosen to stay under it), then swapped for the full one: with WebGL on the CPU (SwiftShader,
// headless) NiiVue's passes over a 512x512x300 CT take tens of seconds; on a GPU, milliseconds.
const PREVIEW_VOXELS = 2 ** 21;

// fetch a NIfTI route as bytes (the volume every `step`-th voxel when step > 1)
async function bytes(url, step, signal) {
  const r = await fetch(step > 1 ? `${url}&step=${step}` : url,
    { credentials: "same-origin", signal });
  if (!r.ok) throw new Error(`${r.status} ${await r.text()}`);
  return r.arrayBuffer();
}

// fetch a part of a NIfTI route: [bytes, (i, j, k) of its first voxel in the whole volume]
async function part(url, signal) {
  const r = await fetch(url, { credentials: "same-origin", signal });
  if (!r.ok) throw new Error(`${r.status} ${await r.text()}`);
  const at = (r.headers.get("X-Region-Start") || "0,0,0").split(",").map(Number);
  return [await r.arrayBuffer(), [at[2], at[1], at[0]]];
}

// What this browser's WebGL is: ["niivue", name] on a GPU, ["slices", why] where WebGL2 is
// missing or runs on the CPU. Asked of a throw-away context (WEBGL_debug_renderer_info): its
// first context costs ~0.5 s of CPU on SwiftShader, so the answer is kept for the tab's
// session (sessionStorage) and, before it is known, asked only once the slice viewer has
// loaded (see the end of this file).
const PROBED = "pacsflow.viewer.renderer";
function probe() {
  const gl = document.createElement("canvas").getContext("webgl2");
  let found = ["slices", "no WebGL2"];
  if (gl) {
    const info = gl.getExtension("WEBGL_debug_renderer_info");
    const name = String(info ? gl.getParameter(info.UNMASKED_RENDERER_WEBGL) :
      gl.getParameter(gl.RENDERER));
    const lose = gl.getExtension("WEBGL_lose_context");
    if (lose) lose.loseContext();
    found = /swiftshader|llvmpipe|softpipe|software|basic render/i.test(name) ?
      ["slices", `WebGL on the CPU (${name})`] : ["niivue", name];
  }
  try { sessionStorage.setItem(PROBED, JSON.stringify(found)); } catch (e) { /* private mode */ }
  return found;
}

// [renderer, why, known]: asked for in the address, else what this tab found before, else
// the slice viewer until the probe has answered (known false)
function chooseRenderer() {
  const asked = new URLSearchParams(location.search).get("viewer");
  if (asked === "niivue" || asked === "slices") return [asked, "asked for", true];
  try {
    const got = JSON.parse(sessionStorage.getItem(PROBED) || "null");
    if (Array.isArray(got) && got.length === 2) return [got[0], got[1], true];
  } catch (e) { /* none kept */ }
  return ["slices", "WebGL not probed yet", false];
}

// ------------------------------------------------------------------ the slice viewer

// where the viewer opens: the finding (its voxel, from the app), else the volume's middle
const centreVox = el.dataset.centreVox ? el.dataset.centreVox.split(",").map(Number) : null;
const startVox = centreVox ? [centreVox[2], centreVox[1], centreVox[0]] : // k,j,i -> i,j,k
  [Math.floor(shape[2] / 2), Math.floor(shape[1] / 2), Math.floor(shape[0] / 2)];
// the planes' requests, by "axis,index": [volume part, mask part] (each [bytes, start])
const planeFetches = new Map();
function fetchPlane(axis, index, signal) {
  const key = `${axis},${index}`;
  if (!planeFetches.has(key)) {
    const got = Promise.all([part(`${el.dataset.volume}&plane=${key}`, signal),
      maskUrl ? part(`${maskUrl}&plane=${key}`, signal) : null]);
    got.catch(() => planeFetches.delete(key)); // asked again when needed
    planeFetches.set(key, got);
  }
  return planeFetches.get(key);
}
// The slice viewer's data, asked for at once: the three planes through the finding, the
// whole volume and the mask cut to the finding (a box, not the volume's size).
const [renderer, why, known] = chooseRenderer();
const early = { abort: new AbortController(), whole: null };
if (renderer === "slices") {
  const signal = early.abort.signal;
  for (const axis of [0, 1, 2]) fetchPlane(axis, startVox[2 - axis], signal).catch(() => {});
  early.whole = [bytes(el.dataset.volume, 1, signal),
    maskUrl ? part(`${maskUrl}&crop=1`, signal) : null];
  early.whole.forEach((p) => p && p.catch(() => {})); // a failure is reported where awaited
}

async function slicesMain() {
  mark("start");
  const { SliceViewer, parseBlock } = await import(el.dataset.slices);
  mark("module");
  const canvas = document.createElement("canvas");
  canvas.id = "nv-slices";
  $("nv-canvas").before(canvas);
  $("nv-canvas").style.display = "none"; // (the page's CSS would override `hidden`)
  // the bitmap is the element's own size: pixels are not stretched by CSS
  const dpr = window.devicePixelRatio || 1;
  const fit = () => {
    canvas.width = Math.round(Math.max(canvas.clientWidth, 300) * dpr);
    canvas.height = Math.round(Math.max(canvas.clientHeight, 200) * dpr);
  };
  fit();
  const affine = el.dataset.affine.split(",").map(Number);
  const sv = new SliceViewer({
    canvas, shape, affine, presets, dpr,
    onLocation: (v) => { $("nv-pos").textContent = posText(v); api.vox = v; },
  });
  api.slices = sv;
  new ResizeObserver(() => { fit(); sv.draw(); }).observe(canvas);
  sv.vox = startVox.slice();
  // the planes' bytes parsed as they come (the first three were asked for before the probe)
  const plane = (axis, index) => {
    const key = `${axis},${index}`;
    if (sv.planes.has(key)) return Promise.resolve();
    const got = fetchPlane(axis, index).then(([v, m]) => {
      if (!sv.planes.has(key)) {
        sv.planes.set(key, { volume: parseBlock(...v), mask: m ? parseBlock(...m) : null });
      }
    });
    return got;
  };
  // before the whole volume is here, a plane scrolled to is asked for (then drawn)
  sv.onMissing = (axes) => {
    if (sv.volume) return;
    Promise.all(axes.map((a) => plane(a, sv.indexOn(a)))).then(() => sv.draw(), () => {});
  };
  await Promise.all([0, 1, 2].map((axis) => plane(axis, startVox[2 - axis])));
  mark("planes");
  const whole = early.whole;
  const preset = presets[$("nv-window").value];
  if (preset) sv.setWindow(preset[0] - preset[1] / 2, preset[0] + preset[1] / 2);
  else sv.autoWindow();
  applyMask();
  sv.setVox(sv.vox);
  mark("first");
  el.dataset.first = String(api.timings.first);
  status("loading the whole volume…");
  sv.volume = parseBlock(await whole[0]);
  mark("volume");
  if (whole[1]) sv.maskBlock = parseBlock(...(await whole[1]));
  mark("mask");
  sv.planes.clear();
  sv.draw();
  mark("frame");
  api.loadMs = api.timings.frame - api.timings.module;
  api.moduleMs = api.timings.module - api.timings.start;
  api.ready = true;
  el.dataset.loaded = String(api.timings.frame);
  status("");
}

// ------------------------------------------------------------------ the page's controls

// Each control calls the active renderer's function of the same name.
const impl = {};
function applyWindow(name) { if (impl.applyWindow) impl.applyWindow(name); }
function applyMask() {
  if (impl.applyMask) impl.applyMask($("nv-mask-mode").value, Number($("nv-opacity").value));
}
impl.applyMask = (mode, opacity) => {
  if (api.slices) { api.slices.mask = { mode, opacity }; api.slices.draw(); }
};
impl.applyWindow = (name) => {
  const sv = api.slices, p = presets[name];
  if (!sv) return;
  if (p) sv.setWindow(p[0] - p[1] / 2, p[0] + p[1] / 2);
  else sv.autoWindow();
};
impl.centre = () => {
  const sv = api.slices, c = el.dataset.centreVox;
  if (!sv) return;
  const v = c ? c.split(",").map(Number) : shape.map((n) => Math.floor(n / 2));
  sv.setVox([v[2], v[1], v[0]]);
};
impl.layout = (name) => { api.slices.layout = name; api.slices.draw(); };
impl.zoom = (f) => api.slices.setZoom(api.slices.zoom * f);
impl.reset = () => { api.slices.reset(); impl.centre(); };
impl.drag = (mode) => { api.slices.dragMode = mode; };

// switch from the slice viewer to NiiVue (the 3-D render, drawing); resolves when it is ready
let niivue = null;
function toNiivue() {
  if (api.renderer === "niivue") return niivue || Promise.resolve();
  api.renderer = "niivue";
  if (api.slices) api.slices.canvas.style.display = "none";
  $("nv-canvas").style.display = "";
  for (const id of editIds) if ($(id)) $(id).disabled = true;
  niivue = niivueMain().then(() => {
    for (const id of editIds) if ($(id)) $(id).disabled = false;
  });
  return niivue;
}

$("nv-layout").addEventListener("change", (e) => {
  if (api.renderer === "slices" && e.target.value === "3-D") {
    status("3-D: loading NiiVue (WebGL on the CPU here: slow for a large volume)…");
    toNiivue().then(() => impl.layout(e.target.value));
  } else if (impl.layout) impl.layout(e.target.value);
});
$("nv-window").addEventListener("change", (e) => applyWindow(e.target.value));
$("nv-mask-mode").addEventListener("change", applyMask);
$("nv-opacity").addEventListener("input", applyMask);
$("nv-centre").addEventListener("click", () => impl.centre && impl.centre());
$("nv-drag").addEventListener("change", (e) => impl.drag && impl.drag(Number(e.target.value)));
$("nv-zoom-in").addEventListener("click", () => impl.zoom && impl.zoom(1.25));
$("nv-zoom-out").addEventListener("click", () => impl.zoom && impl.zoom(0.8));
$("nv-reset").addEventListener("click", () => impl.reset && impl.reset());
if ($("nv-save")) {
  const pen = (value) => {
    const go = () => {
      impl.pen(value);
      status(value ? "brush: drag to add to the mask" : "erase: drag to remove from the mask");
    };
    if (api.renderer === "niivue") go();
    else { status("drawing: loading NiiVue…"); toNiivue().then(go); }
  };
  $("nv-brush").addEventListener("click", () => pen(1));
  $("nv-erase").addEventListener("click", () => pen(0));
  $("nv-view").addEventListener("click", () => { if (impl.view) impl.view(); status(""); });
  $("nv-undo").addEventListener("click", () => impl.undo && impl.undo());
  $("nv-save").addEventListener("click", () => api.save().then(
    (r) => status(`correction saved (${r.voxel_count} voxels)`),
    (err) => status(`not saved: ${err.message}`)));
}
api.applyWindow = applyWindow;
api.applyMask = applyMask;
api.centre = () => impl.centre && impl.centre();
api.save = () => Promise.reject(new Error("open the drawing tools first"));
api.toNiivue = toNiivue;

// ------------------------------------------------------------------ NiiVue

async function niivueMain() {
  const t0 = performance.now();
  mark("start");
  const voxels = shape[0] * shape[1] * shape[2];
  // after the slice viewer (a switch to 3-D or drawing) its whole volume and mask serve
  const had = api.slices && api.slices.volume ? api.slices : null;
  const step = had ? 1 : voxels > PREVIEW_VOXELS ? Math.ceil(Math.cbrt(voxels / PREVIEW_VOXELS)) : 1;
  // the downloads start now, while the module loads: the preview's (when any) first
  const first = had ? [Promise.resolve(had.volume.values.buffer.slice(0)),
    maskUrl ? bytes(maskUrl, 1) : null] :
    [bytes(el.dataset.volume, step), maskUrl ? bytes(maskUrl, step) : null];
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
  impl.applyWindow = function (name) {
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
  };
  impl.applyMask = function (mode, op) {
    if (mode === "off") { nv.drawOpacity = 0; nv.drawRimOpacity = -1; }
    else if (mode === "outline") { nv.drawOpacity = 0.01; nv.drawRimOpacity = Math.max(op, 0.5); }
    else { nv.drawOpacity = op; nv.drawRimOpacity = -1; }
    nv.drawScene();
  };
  impl.centre = function () {
    const c = el.dataset.centre;
    if (c) {
      nv.scene.crosshairPos = nv.mm2frac(c.split(",").map(Number));
    } else {
      nv.scene.crosshairPos = [0.5, 0.5, 0.5];
    }
    nv.drawScene();
    nv.createOnLocationChange();
  };
  // slice numbers from 1, in the stored array's axes (slice, row, column)
  nv.onLocationChange = (data) => {
    const v = data.vox || [0, 0, 0];
    $("nv-pos").textContent = posText(v);
    api.vox = v;
  };
  const layouts = { axial: SLICE_TYPE.AXIAL, coronal: SLICE_TYPE.CORONAL,
    sagittal: SLICE_TYPE.SAGITTAL, multiplanar: SLICE_TYPE.MULTIPLANAR, "3-D": SLICE_TYPE.RENDER };
  impl.layout = (name) => nv.setSliceType(layouts[name]);
  impl.drag = (mode) => { nv.opts.dragModePrimary = mode; }; // 8 crosshair, 9 window, 3 pan
  impl.zoom = function (f) {
    const p = nv.scene.pan2Dxyzmm;
    nv.setPan2Dxyzmm([p[0], p[1], p[2], Math.min(Math.max(p[3] * f, 0.5), 16)]);
  };
  impl.reset = () => { nv.setPan2Dxyzmm([0, 0, 0, 1]); impl.centre(); };
  impl.pen = (value) => { nv.setDrawingEnabled(true); nv.setPenValue(value, false); };
  impl.view = () => nv.setDrawingEnabled(false);
  impl.undo = () => nv.drawUndo();
  nv.setSliceType(layouts[$("nv-layout").value] ?? SLICE_TYPE.MULTIPLANAR);
  nv.opts.dragModePrimary = Number($("nv-drag").value);

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
  // a frame on screen: the next animation frame, once the GPU has done all it was asked
  // (reading one pixel waits for it; WebGL calls only queue work)
  const frame = () => new Promise((resolve) => requestAnimationFrame(() => {
    nv.gl.readPixels(0, 0, 1, 1, nv.gl.RGBA, nv.gl.UNSIGNED_BYTE, new Uint8Array(4));
    resolve();
  }));
  applyMask();
  impl.centre();
  await frame();
  if (step > 1) { // the preview is on screen: now the full volume (no drawing until then)
    mark("preview");
    el.dataset.preview = String(api.timings.preview);
    for (const id of editIds) if ($(id)) $(id).disabled = true;
    status(`preview (every ${step}th voxel); loading the full volume…`);
    await show(full[0], full[1], "");
    for (const id of editIds) if ($(id)) $(id).disabled = false;
    applyWindow($("nv-window").value);
    applyMask();
    impl.centre();
    await frame();
  }
  mark("frame");
  api.ready = true;
  el.dataset.loaded = String(api.timings.frame);
  status("");
}

api.renderer = renderer;
api.rendererWhy = why;
const fail = (err) => {
  api.error = String(err && err.message ? err.message : err);
  status(`viewer unavailable: ${api.error}`);
};
if (renderer === "niivue") {
  niivueMain().catch(fail);
} else {
  slicesMain().then(() => {
    if (known) return;
    // first page of this tab: now ask what the WebGL is; on a GPU, NiiVue takes over (the
    // volume already here), and the next pages open in it directly
    const [found, name] = probe();
    mark("probe");
    api.rendererWhy = name;
    if (found === "niivue" && api.renderer === "slices") {
      status(`a GPU (${name}): switching to NiiVue…`);
      toNiivue().then(() => status(""), fail);
    }
  }, fail);
}
