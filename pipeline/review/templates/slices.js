// The finding view's slice viewer (issue #23): three planes (or one) of the de-identified
// volume and the finding's mask, drawn with the 2-D canvas, for browsers whose WebGL runs on
// the CPU (SwiftShader, llvmpipe) or is missing, where NiiVue takes tens of seconds on a large
// CT. The first frame needs only the three planes through the finding (six small NIfTI
// requests, `plane=axis,index`, cut from the memory-mapped tensor by the app); the whole
// volume and mask then load behind it, and from then on every plane is cut here, in memory.
// NiiVue stays the viewer for the 3-D render and for drawing corrections (viewer.js).
//
// Planes are the stored array's (slice k, row j, column i). Each is turned on screen by the
// tensor's affine (LPS mm): axial planes with the patient's left on the right and anterior
// up, coronal with left on the right and superior up, sagittal with anterior on the left and
// superior up (radiological convention, as NiiVue's); pixels keep their millimetre aspect.

// ------------------------------------------------------------------------------ NIfTI blocks

const TYPES = { 2: Uint8Array, 4: Int16Array, 8: Int32Array, 16: Float32Array, 64: Float64Array,
  256: Int8Array, 512: Uint16Array };

// A NIfTI-1 of the app (x = column fastest, little endian) as a block of the volume: its
// dims, its first voxel in the whole volume's (i, j, k) and its values.
export function parseBlock(buf, start) {
  const head = new DataView(buf, 0, 352);
  if (head.getInt32(0, true) !== 348) throw new Error("not a little-endian NIfTI-1");
  const dims = [1, 2, 3].map((d) => head.getInt16(40 + 2 * d, true));
  const Type = TYPES[head.getInt16(70, true)];
  if (!Type) throw new Error(`NIfTI datatype ${head.getInt16(70, true)} is not shown`);
  const offset = head.getFloat32(108, true);
  const values = new Type(buf, offset, dims[0] * dims[1] * dims[2]);
  return { dims, start: start || [0, 0, 0], values };
}

// The values of plane `index` across array axis `axis` (0: slice k, 1: row j, 2: column i)
// of a volume of `full` = [I, J, K] voxels, from a block holding any part of it (the whole
// volume, one plane, or a mask cut to its finding), as a (w x h) image in array order:
// columns u, rows v, where (u, v) is (i, j) for a slice, (i, k) for a row plane and (j, k) for
// a column plane. What the block does not hold is 0.
export function planeOf(block, axis, index, Out, full) {
  const [X, Y, Z] = block.dims;
  const [i0, j0, k0] = block.start;
  const [I, J, K] = full || [i0 + X, j0 + Y, k0 + Z];
  const src = block.values;
  // the plane's size; where the block sits in it (offset, extent); the plane's index in the
  // block, the block's depth across the axis; strides in the block's values
  let w, h, uo, vo, un, vn, n, depth, du, dv, base;
  if (axis === 0) {
    [w, h, uo, vo, un, vn, n, depth, du, dv] = [I, J, i0, j0, X, Y, index - k0, Z, 1, X];
    base = X * Y * n;
  } else if (axis === 1) {
    [w, h, uo, vo, un, vn, n, depth, du, dv] = [I, K, i0, k0, X, Z, index - j0, Y, 1, X * Y];
    base = X * n;
  } else {
    [w, h, uo, vo, un, vn, n, depth, du, dv] = [J, K, j0, k0, Y, Z, index - i0, X, X, X * Y];
    base = n;
  }
  const out = new (Out || src.constructor)(w * h);
  if (n < 0 || n >= depth) return { w, h, values: out };
  for (let v = 0; v < vn; v++) {
    const o = (v + vo) * w + uo, s0 = base + v * dv;
    if (du === 1) out.set(src.subarray(s0, s0 + un), o);
    else for (let u = 0, s = s0; u < un; u++, s += du) out[o + u] = src[s];
  }
  return { w, h, values: out };
}

// ------------------------------------------------------------------------------ orientation

const LETTERS = [["R", "L"], ["A", "P"], ["I", "S"]]; // LPS axes: minus, plus

function letter(vec) {
  let best = 0;
  for (let a = 1; a < 3; a++) if (Math.abs(vec[a]) > Math.abs(vec[best])) best = a;
  return LETTERS[best][vec[best] > 0 ? 1 : 0];
}

const dot = (a, b) => a[0] * b[0] + a[1] * b[1] + a[2] * b[2];
const norm = (a) => Math.hypot(a[0], a[1], a[2]);

// How the plane across `axis` is put on screen: which of its array axes runs across (the
// other down), whether each is flipped, the millimetres of a pixel each way, its name and the
// letters at its edges. `cols` are the affine's columns (LPS mm per step of i, j, k).
export function screenOf(axis, cols) {
  const inPlane = axis === 0 ? [0, 1] : axis === 1 ? [0, 2] : [1, 2]; // array axes as i=0,j=1,k=2
  const normal = cols[[2, 1, 0][axis]];
  const n = normal.map(Math.abs);
  const kind = n[2] >= n[0] && n[2] >= n[1] ? "axial" : n[1] >= n[0] ? "coronal" : "sagittal";
  // wanted screen right and screen down, in LPS
  const right = kind === "sagittal" ? [0, 1, 0] : [1, 0, 0];
  const down = kind === "axial" ? [0, 1, 0] : [0, 0, -1];
  // u is the plane's first in-plane axis (i, or j for a column plane), v its second
  const [du, dv] = inPlane.map((a) => cols[a]);
  const uAcross = Math.abs(dot(du, right)) / norm(du) >= Math.abs(dot(dv, right)) / norm(dv);
  const across = uAcross ? du : dv, downVec = uAcross ? dv : du;
  const flipX = dot(across, right) < 0, flipY = dot(downVec, down) < 0;
  const sx = flipX ? -1 : 1, sy = flipY ? -1 : 1;
  const r = across.map((c) => c * sx), d = downVec.map((c) => c * sy);
  return {
    kind, uAcross, flipX, flipY, mmX: norm(across), mmY: norm(downVec),
    labels: { left: letter(r.map((c) => -c)), right: letter(r), top: letter(d.map((c) => -c)),
      bottom: letter(d) },
  };
}

// ------------------------------------------------------------------------------ the viewer

const MASK_RGB = [255, 70, 60];

export class SliceViewer {
  // el: the #nv card; canvas: a 2-D canvas; shape: [slices, rows, columns]; affine: 16 LPS
  constructor({ canvas, shape, affine, presets, onLocation, dpr }) {
    this.canvas = canvas;
    this.dpr = dpr || 1; // canvas pixels per CSS pixel (text and lines keep their size)
    this.ctx = canvas.getContext("2d");
    this.shape = shape; // [K, J, I]
    this.full = [shape[2], shape[1], shape[0]]; // [I, J, K]
    const a = affine;
    this.cols = [[a[0], a[4], a[8]], [a[1], a[5], a[9]], [a[2], a[6], a[10]]]; // i, j, k
    this.screens = [0, 1, 2].map((axis) => screenOf(axis, this.cols));
    this.presets = presets;
    this.onLocation = onLocation || (() => {});
    this.vox = [Math.floor(shape[2] / 2), Math.floor(shape[1] / 2), Math.floor(shape[0] / 2)];
    this.layout = "multiplanar";
    this.window = [0, 1];
    this.mask = { mode: "fill", opacity: 0.45 };
    this.zoom = 1;
    this.pan = [0, 0];
    this.volume = null; // the whole volume's block, once loaded
    this.maskBlock = null;
    this.planes = new Map(); // "axis,index" -> {volume, mask} blocks of single planes
    this.dragMode = 8; // 8 crosshair, 9 window/level, 3 pan (NiiVue's numbers)
    this.panes = [];
    this._listen();
  }

  // the pane rectangles of the layout, each showing the plane across one array axis
  _layoutPanes() {
    const W = this.canvas.width, H = this.canvas.height;
    const order = this.screens.map((s, axis) => ({ axis, kind: s.kind }));
    const byKind = (k) => order.find((o) => o.kind === k) || order[["axial", "coronal",
      "sagittal"].indexOf(k)];
    if (this.layout !== "multiplanar") {
      return [{ axis: byKind(this.layout).axis, x: 0, y: 0, w: W, h: H }];
    }
    const w = Math.floor(W / 3);
    return ["axial", "coronal", "sagittal"].map((k, n) => ({ axis: byKind(k).axis, x: n * w,
      y: 0, w, h: H }));
  }

  indexOn(axis) { return this.vox[2 - axis]; }

  // plane values of volume and mask across `axis` at the current position, or null
  _plane(axis) {
    const index = this.indexOn(axis);
    const full = this.full;
    if (this.volume) {
      return { vol: planeOf(this.volume, axis, index, null, full),
        mask: this.maskBlock ? planeOf(this.maskBlock, axis, index, Uint8Array, full) : null };
    }
    const got = this.planes.get(`${axis},${index}`);
    if (!got) return null;
    return { vol: planeOf(got.volume, axis, index, null, full),
      mask: got.mask ? planeOf(got.mask, axis, index, Uint8Array, full) : null };
  }

  setWindow(lo, hi) { this.window = [lo, Math.max(hi, lo + 1e-6)]; this.draw(); }

  // a window spanning the 1st..99th percentile of the values at hand (planes or volume)
  autoWindow() {
    const sample = [];
    for (let axis = 0; axis < 3; axis++) {
      const p = this._plane(axis);
      if (!p) continue;
      const v = p.vol.values, step = Math.max(1, Math.floor(v.length / 20000));
      for (let n = 0; n < v.length; n += step) sample.push(v[n]);
    }
    if (!sample.length) return;
    sample.sort((x, y) => x - y);
    const at = (q) => sample[Math.min(sample.length - 1, Math.floor(q * sample.length))];
    this.setWindow(at(0.01), at(0.99));
  }

  // the screen image of a plane: window and mask applied, turned as its screen says
  _image(axis, plane) {
    const s = this.screens[axis];
    const { w, h, values } = plane.vol;
    const W = s.uAcross ? w : h, H = s.uAcross ? h : w;
    const img = new ImageData(W, H);
    const px = new Uint32Array(img.data.buffer);
    const [lo, hi] = this.window, scale = 255 / (hi - lo);
    const mask = plane.mask && this.mask.mode !== "off" ? plane.mask.values : null;
    const outline = this.mask.mode === "outline";
    const op = outline ? Math.max(this.mask.opacity, 0.6) : this.mask.opacity;
    for (let v = 0; v < h; v++) {
      for (let u = 0; u < w; u++) {
        const n = u + v * w;
        let g = (values[n] - lo) * scale;
        g = g < 0 ? 0 : g > 255 ? 255 : g | 0;
        let r = g, gg = g, b = g;
        if (mask && mask[n]) {
          const edge = !outline || u === 0 || v === 0 || u === w - 1 || v === h - 1 ||
            !mask[n - 1] || !mask[n + 1] || !mask[n - w] || !mask[n + w];
          if (edge) {
            r = r + (MASK_RGB[0] - r) * op; gg = gg + (MASK_RGB[1] - gg) * op;
            b = b + (MASK_RGB[2] - b) * op;
          }
        }
        let x = s.uAcross ? u : v, y = s.uAcross ? v : u;
        if (s.flipX) x = W - 1 - x;
        if (s.flipY) y = H - 1 - y;
        px[x + y * W] = 0xff000000 | (b << 16) | (gg << 8) | r; // little-endian RGBA
      }
    }
    return img;
  }

  // where a plane's image sits in its pane (mm aspect kept, zoomed and panned)
  _placement(pane) {
    const s = this.screens[pane.axis];
    const [K, J, I] = this.shape;
    const dimsUV = pane.axis === 0 ? [I, J] : pane.axis === 1 ? [I, K] : [J, K];
    const W = s.uAcross ? dimsUV[0] : dimsUV[1], H = s.uAcross ? dimsUV[1] : dimsUV[0];
    const fit = Math.min(pane.w / (W * s.mmX), pane.h / (H * s.mmY)) * this.zoom;
    const dw = W * s.mmX * fit, dh = H * s.mmY * fit;
    return { W, H, x: pane.x + (pane.w - dw) / 2 + this.pan[0], y: pane.y + (pane.h - dh) / 2 +
      this.pan[1], dw, dh };
  }

  // screen position of array (u, v) of the plane in a pane, and back
  _toScreen(pane, u, v) {
    const s = this.screens[pane.axis], p = this._placement(pane);
    let x = s.uAcross ? u : v, y = s.uAcross ? v : u;
    if (s.flipX) x = p.W - 1 - x;
    if (s.flipY) y = p.H - 1 - y;
    return [p.x + (x + 0.5) * p.dw / p.W, p.y + (y + 0.5) * p.dh / p.H];
  }

  _fromScreen(pane, sx, sy) {
    const s = this.screens[pane.axis], p = this._placement(pane);
    let x = Math.floor((sx - p.x) * p.W / p.dw), y = Math.floor((sy - p.y) * p.H / p.dh);
    x = Math.min(Math.max(x, 0), p.W - 1);
    y = Math.min(Math.max(y, 0), p.H - 1);
    if (s.flipX) x = p.W - 1 - x;
    if (s.flipY) y = p.H - 1 - y;
    return s.uAcross ? [x, y] : [y, x];
  }

  // (u, v) of the current position in the plane across `axis`
  _uv(axis) {
    const [i, j, k] = this.vox;
    return axis === 0 ? [i, j] : axis === 1 ? [i, k] : [j, k];
  }

  draw() {
    const ctx = this.ctx, W = this.canvas.width, H = this.canvas.height;
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, W, H);
    this.panes = this._layoutPanes();
    this.missing = [];
    for (const pane of this.panes) {
      const plane = this._plane(pane.axis);
      if (!plane) { this.missing.push(pane.axis); continue; }
      const img = this._image(pane.axis, plane);
      const off = this._off || (this._off = document.createElement("canvas"));
      off.width = img.width;
      off.height = img.height;
      off.getContext("2d").putImageData(img, 0, 0);
      const p = this._placement(pane);
      ctx.save();
      ctx.beginPath();
      ctx.rect(pane.x, pane.y, pane.w, pane.h);
      ctx.clip();
      ctx.imageSmoothingEnabled = this.zoom < 2;
      ctx.drawImage(off, p.x, p.y, p.dw, p.dh);
      // crosshair through the current position
      const [u, v] = this._uv(pane.axis);
      const [cx, cy] = this._toScreen(pane, u, v);
      ctx.strokeStyle = "rgba(255, 217, 0, 0.8)";
      ctx.lineWidth = this.dpr;
      ctx.beginPath();
      ctx.moveTo(pane.x, Math.round(cy) + 0.5); ctx.lineTo(pane.x + pane.w, Math.round(cy) + 0.5);
      ctx.moveTo(Math.round(cx) + 0.5, pane.y); ctx.lineTo(Math.round(cx) + 0.5, pane.y + pane.h);
      ctx.stroke();
      // orientation letters and the plane's number (from 1)
      const s = this.screens[pane.axis], L = s.labels, m = 4 * this.dpr;
      ctx.fillStyle = "#fff";
      ctx.font = `${14 * this.dpr}px sans-serif`;
      ctx.textBaseline = "middle";
      ctx.textAlign = "left"; ctx.fillText(L.left, pane.x + m, pane.y + pane.h / 2);
      ctx.textAlign = "right"; ctx.fillText(L.right, pane.x + pane.w - m, pane.y + pane.h / 2);
      ctx.textAlign = "center";
      ctx.textBaseline = "top"; ctx.fillText(L.top, pane.x + pane.w / 2, pane.y + m);
      ctx.textBaseline = "bottom"; ctx.fillText(L.bottom, pane.x + pane.w / 2, pane.y + pane.h - m);
      ctx.textAlign = "left";
      const n = this.shape[pane.axis];
      ctx.fillText(`${s.kind} ${this.indexOn(pane.axis) + 1}/${n}`, pane.x + m, pane.y + pane.h - m);
      ctx.restore();
    }
    if (this.missing.length && this.onMissing) this.onMissing(this.missing);
  }

  // move the position (clamped) and tell the page
  setVox(vox) {
    this.vox = vox.map((v, a) => Math.min(Math.max(Math.round(v), 0), this.shape[2 - a] - 1));
    this.draw();
    this.onLocation(this.vox);
  }

  _pane(e) {
    const r = this.canvas.getBoundingClientRect();
    const x = (e.clientX - r.left) * this.canvas.width / r.width;
    const y = (e.clientY - r.top) * this.canvas.height / r.height;
    const pane = this.panes.find((p) => x >= p.x && x < p.x + p.w && y >= p.y && y < p.y + p.h);
    return { pane, x, y };
  }

  _listen() {
    const c = this.canvas;
    let drag = null;
    c.addEventListener("contextmenu", (e) => e.preventDefault());
    c.addEventListener("pointerdown", (e) => {
      const { pane, x, y } = this._pane(e);
      if (!pane) return;
      const mode = e.button === 2 ? 9 : this.dragMode;
      drag = { mode, pane, x, y, window: this.window.slice(), pan: this.pan.slice() };
      c.setPointerCapture(e.pointerId);
      if (mode === 8) this._point(pane, x, y);
    });
    c.addEventListener("pointermove", (e) => {
      if (!drag) return;
      const { x, y } = this._pane(e);
      if (drag.mode === 8) this._point(drag.pane, x, y);
      else if (drag.mode === 3) { this.pan = [drag.pan[0] + x - drag.x, drag.pan[1] + y - drag.y]; this.draw(); }
      else if (drag.mode === 9) { // right: wider; down: lower level (brighter)
        const [lo, hi] = drag.window, width = hi - lo, centre = (lo + hi) / 2;
        const w2 = Math.max(1, width * Math.exp((x - drag.x) / 200));
        const c2 = centre - (y - drag.y) * width / 300;
        this.setWindow(c2 - w2 / 2, c2 + w2 / 2);
      }
    });
    const end = () => { drag = null; };
    c.addEventListener("pointerup", end);
    c.addEventListener("pointercancel", end);
    c.addEventListener("wheel", (e) => {
      const { pane } = this._pane(e);
      if (!pane) return;
      e.preventDefault();
      if (this.dragMode === 3) { this.setZoom(this.zoom * (e.deltaY < 0 ? 1.25 : 0.8)); return; }
      const v = this.vox.slice();
      v[2 - pane.axis] += e.deltaY < 0 ? 1 : -1;
      this.setVox(v);
    }, { passive: false });
  }

  _point(pane, x, y) {
    const [u, v] = this._fromScreen(pane, x, y);
    const vox = this.vox.slice();
    if (pane.axis === 0) { vox[0] = u; vox[1] = v; }
    else if (pane.axis === 1) { vox[0] = u; vox[2] = v; }
    else { vox[1] = u; vox[2] = v; }
    this.setVox(vox);
  }

  setZoom(z) { this.zoom = Math.min(Math.max(z, 0.5), 16); this.draw(); }

  reset() { this.zoom = 1; this.pan = [0, 0]; }
}
