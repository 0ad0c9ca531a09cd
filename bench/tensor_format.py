"""Tensor file format benchmark for the tensor store (issue #5).

Measures, page cache warm, best of N, for a 512x512x300 CT-like volume (int16, and a float32
variant): write time, file size, full load into numpy and into torch, random single-slice and
96^3 patch reads where the format supports partial reads, and the checksum cost of the file
bytes. Prints Markdown tables.

    .venv/bin/python bench/tensor_format.py [--repeat 5] [--dir DIR] [--dtypes int16,float32]

Needs numpy and torch; nibabel, safetensors, zarr, h5py, xxhash and monai are measured when
installed. Files go to a temporary directory on the same file system as the repo (not tmpfs)
unless --dir is given; they are removed afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata as md
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore")

SHAPE = (300, 512, 512)  # (z, y, x), C order: one axial slice is contiguous
PATCH = 96
AFFINE = np.array(
    [[-0.7, 0, 0, 180.0], [0, -0.7, 0, 180.0], [0, 0, 1.25, -400.0], [0, 0, 0, 1]], dtype=np.float64
)


def opt(name):
    try:
        return __import__(name)
    except Exception:
        return None


nib = opt("nibabel")
safetensors = opt("safetensors")
zarr = opt("zarr")
h5py = opt("h5py")
xxhash = opt("xxhash")
monai = opt("monai")


# --------------------------------------------------------------------------- volume


def make_volume(dtype: str, seed: int = 0) -> np.ndarray:
    """CT-like volume in HU: air, elliptic body (fat rim, soft tissue), lungs, spine, table,
    smooth low-frequency variation, Gaussian noise (sigma ~12 HU) everywhere."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = SHAPE
    y, x = np.mgrid[0:ny, 0:nx].astype(np.float32)
    cy, cx = ny / 2 + 10, nx / 2
    vol = np.empty(SHAPE, dtype=np.float32)
    for z in range(nz):
        t = z / nz
        a, b = 200 + 25 * np.sin(np.pi * t), 140 + 20 * np.sin(np.pi * t)
        r = ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2
        s = np.full((ny, nx), -1000.0, dtype=np.float32)
        s[r < 1.0] = -100.0  # subcutaneous fat
        s[r < 0.8] = 40.0 + 15 * np.sin(x[r < 0.8] / 37.0) * np.cos(y[r < 0.8] / 29.0)
        if t > 0.45:  # lungs in the upper part
            for sx in (-1, 1):
                rl = ((x - cx - sx * 85) / 70) ** 2 + ((y - cy + 10) / 90) ** 2
                s[rl < 1.0] = -850.0 + 30 * np.cos(x[rl < 1.0] / 11.0)
        rs = ((x - cx) / 22) ** 2 + ((y - cy - 95) / 22) ** 2  # vertebra
        s[rs < 1.0] = 400.0
        s[rs < 0.5] = 900.0
        s[(y > cy + b + 20) & (y < cy + b + 30) & (abs(x - cx) < 230)] = 200.0  # table
        vol[z] = s
    vol += rng.normal(0.0, 12.0, size=SHAPE).astype(np.float32)
    if dtype == "int16":
        return np.clip(np.rint(vol), -1024, 3071).astype(np.int16)
    return vol.astype(np.float32)


# --------------------------------------------------------------------------- timing


def best(fn, n):
    ts = []
    out = None
    for _ in range(n):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
        del out
    return min(ts)


def best_partial(fn, rng, n, k=20):
    """Median over k random positions, best of n rounds; returns seconds."""
    nz, ny, nx = SHAPE
    rounds = []
    for _ in range(n):
        ts = []
        for _ in range(k):
            z = int(rng.integers(0, nz - PATCH))
            y = int(rng.integers(0, ny - PATCH))
            x = int(rng.integers(0, nx - PATCH))
            t0 = time.perf_counter()
            out = fn(z, y, x)
            ts.append(time.perf_counter() - t0)
            del out
        rounds.append(statistics.median(ts))
    return min(rounds)


def size_of(p: Path) -> int:
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size


def rm(p: Path):
    if p.is_dir():
        shutil.rmtree(p)
    elif p.exists():
        p.unlink()


def read_floor(p: Path, nbytes: int) -> np.ndarray:
    buf = np.empty(nbytes, dtype=np.uint8)
    with open(p, "rb", buffering=0) as f:
        f.readinto(memoryview(buf))
    return buf


# --------------------------------------------------------------------------- formats
# Each format: name, suffix, write(arr, path), load_np(path), load_torch(path),
# slice(path) -> fn(z,y,x) or None, patch(path) -> fn(z,y,x) or None, repeat factor.


def fmt_npy():
    def write(a, p):
        np.save(p, a)

    def load_np(p):
        return np.load(p)

    def load_t(p):
        return torch.from_numpy(np.load(p))

    def sl(p):
        mm = np.load(p, mmap_mode="r")
        return lambda z, y, x: np.array(mm[z])

    def pa(p):
        mm = np.load(p, mmap_mode="r")
        return lambda z, y, x: np.array(mm[z : z + PATCH, y : y + PATCH, x : x + PATCH])

    return dict(
        name=".npy (np.save / np.load)",
        suffix=".npy",
        write=write,
        load_np=load_np,
        load_t=load_t,
        slice=sl,
        patch=pa,
    )


def fmt_npy_mmap():
    def load_np(p):
        return np.array(np.load(p, mmap_mode="r"))  # np.asarray would not copy: lazy

    def load_t(p):
        return torch.from_numpy(np.array(np.load(p, mmap_mode="r")))

    return dict(
        name=".npy (np.load mmap_mode='r' + copy)",
        suffix=".npy",
        write=None,
        load_np=load_np,
        load_t=load_t,
        slice=None,
        patch=None,
        same_as=".npy",
    )


def fmt_nifti(gz=False):
    def write(a, p):
        # a is (z, y, x) C order; NIfTI is (x, y, z) Fortran order, a.T is exactly that
        img = nib.Nifti1Image(a.T, AFFINE)
        img.header.set_xyzt_units("mm", "sec")
        nib.save(img, p)

    def load_np(p):
        # the raw stored dtype, no scaling to float64 (get_fdata would cost more)
        return np.asanyarray(nib.load(p, mmap=False).dataobj)

    def load_t(p):
        return torch.from_numpy(np.asanyarray(nib.load(p, mmap=False).dataobj))

    def sl(p):
        prox = nib.load(p).dataobj  # ArrayProxy, mmap for .nii
        return lambda z, y, x: np.asarray(prox[:, :, z])

    def pa(p):
        prox = nib.load(p).dataobj
        return lambda z, y, x: np.asarray(prox[x : x + PATCH, y : y + PATCH, z : z + PATCH])

    if gz:
        return dict(
            name=".nii.gz (nibabel, gzip level 1 default)",
            suffix=".nii.gz",
            write=write,
            load_np=load_np,
            load_t=load_t,
            slice=sl,
            patch=None,
            repeat=1,
        )
    return dict(
        name=".nii (nibabel, uncompressed)",
        suffix=".nii",
        write=write,
        load_np=load_np,
        load_t=load_t,
        slice=sl,
        patch=pa,
    )


def fmt_monai_nii():
    from monai.transforms import LoadImage

    li = LoadImage(reader="NibabelReader", image_only=True)
    li_keep = LoadImage(reader="NibabelReader", image_only=True, dtype=None)

    def load_np(p):
        return li_keep(str(p))  # MetaTensor, stored dtype

    def load_t(p):
        return li(str(p))  # default: float32 MetaTensor

    return dict(
        name="  MONAI LoadImage(NibabelReader) on the .nii: np=dtype None, torch=default float32",
        suffix=".nii",
        write=None,
        load_np=load_np,
        load_t=load_t,
        slice=None,
        patch=None,
        same_as=".nii",
        repeat=3,
    )


def fmt_monai_npy():
    from monai.transforms import LoadImage

    li = LoadImage(reader="NumpyReader", image_only=True)
    li_keep = LoadImage(reader="NumpyReader", image_only=True, dtype=None)

    def load_np(p):
        return li_keep(str(p))

    def load_t(p):
        return li(str(p))

    return dict(
        name="  MONAI LoadImage(NumpyReader) on the .npy: np=dtype None, torch=default float32",
        suffix=".npy",
        write=None,
        load_np=load_np,
        load_t=load_t,
        slice=None,
        patch=None,
        same_as=".npy",
        repeat=3,
    )


def fmt_safetensors():
    from safetensors import safe_open
    from safetensors.numpy import load_file as np_load
    from safetensors.numpy import save_file as np_save
    from safetensors.torch import load_file as t_load

    def write(a, p):
        np_save({"image": a}, str(p), metadata={"affine": json.dumps(AFFINE.tolist())})

    def load_np(p):
        return np_load(str(p))["image"]

    def load_t(p):
        # load_file maps the file lazily (0.1 ms, pages fault in on first touch): clone()
        # makes the comparison with the other rows fair (data resident in private memory)
        return t_load(str(p))["image"].clone()

    def sl(p):
        f = safe_open(str(p), framework="np")
        s = f.get_slice("image")
        return lambda z, y, x: s[z]

    def pa(p):
        f = safe_open(str(p), framework="np")
        s = f.get_slice("image")
        return lambda z, y, x: s[z : z + PATCH, y : y + PATCH, x : x + PATCH]

    return dict(
        name=".safetensors (torch: load_file + clone)",
        suffix=".safetensors",
        write=write,
        load_np=load_np,
        load_t=load_t,
        slice=sl,
        patch=pa,
    )


def fmt_zarr(codec: str):
    from zarr.codecs import BloscCodec, ZstdCodec

    comp = {
        "none": None,
        "blosc-lz4": BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),
        "blosc-zstd1": BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle"),
        "zstd1": ZstdCodec(level=1),
    }[codec]

    def write(a, p):
        z = zarr.create_array(
            store=str(p),
            shape=a.shape,
            chunks=(1, *a.shape[1:]),
            dtype=a.dtype,
            compressors=comp,
            overwrite=True,
            attributes={"affine": AFFINE.tolist()},
        )
        z[:] = a

    def load_np(p):
        return zarr.open_array(str(p), mode="r")[:]

    def load_t(p):
        return torch.from_numpy(zarr.open_array(str(p), mode="r")[:])

    def sl(p):
        z_ = zarr.open_array(str(p), mode="r")
        return lambda z, y, x: z_[z]

    def pa(p):
        z_ = zarr.open_array(str(p), mode="r")
        return lambda z, y, x: z_[z : z + PATCH, y : y + PATCH, x : x + PATCH]

    return dict(
        name=f"zarr v3, (1,512,512) chunks, {codec}",
        suffix=f".{codec}.zarr",
        write=write,
        load_np=load_np,
        load_t=load_t,
        slice=sl,
        patch=pa,
    )


def fmt_torch():
    def write(a, p):
        torch.save(torch.from_numpy(a), p)

    def load_t(p):
        return torch.load(p, weights_only=True)

    def load_np(p):
        return torch.load(p, weights_only=True).numpy()

    def sl(p):
        t = torch.load(p, weights_only=True, mmap=True)
        return lambda z, y, x: t[z].clone()

    def pa(p):
        t = torch.load(p, weights_only=True, mmap=True)
        return lambda z, y, x: t[z : z + PATCH, y : y + PATCH, x : x + PATCH].clone()

    return dict(
        name=".pt (torch.save / torch.load, weights_only)",
        suffix=".pt",
        write=write,
        load_np=load_np,
        load_t=load_t,
        slice=sl,
        patch=pa,
    )


def fmt_h5():
    def write(a, p):
        with h5py.File(p, "w") as f:
            d = f.create_dataset("image", data=a)  # contiguous, uncompressed
            d.attrs["affine"] = AFFINE

    def load_np(p):
        with h5py.File(p, "r") as f:
            return f["image"][()]

    def load_t(p):
        return torch.from_numpy(load_np(p))

    def sl(p):
        f = h5py.File(p, "r")
        d = f["image"]
        return lambda z, y, x: d[z]

    def pa(p):
        f = h5py.File(p, "r")
        d = f["image"]
        return lambda z, y, x: d[z : z + PATCH, y : y + PATCH, x : x + PATCH]

    return dict(
        name="HDF5 (h5py, contiguous, uncompressed)",
        suffix=".h5",
        write=write,
        load_np=load_np,
        load_t=load_t,
        slice=sl,
        patch=pa,
    )


def formats(include_gz: bool):
    out = [fmt_npy(), fmt_npy_mmap()]
    if monai:
        out.append(fmt_monai_npy())
    if nib:
        out.append(fmt_nifti())
        if monai:
            out.append(fmt_monai_nii())
        if include_gz:
            out.append(fmt_nifti(gz=True))
    if safetensors:
        out.append(fmt_safetensors())
    if zarr:
        out += [fmt_zarr("none"), fmt_zarr("blosc-lz4"), fmt_zarr("blosc-zstd1"), fmt_zarr("zstd1")]
    out.append(fmt_torch())
    if h5py:
        out.append(fmt_h5())
    return out


# --------------------------------------------------------------------------- checksums


def checksums(p: Path, n: int):
    nbytes = p.stat().st_size
    chunk = 8 << 20

    def stream(h):
        buf = bytearray(chunk)
        mv = memoryview(buf)
        with open(p, "rb", buffering=0) as f:
            while k := f.readinto(mv):
                h.update(mv[:k])
        return h.digest()

    algos = [
        ("blake2b (hashlib)", lambda: hashlib.blake2b(digest_size=32)),
        ("sha256 (hashlib)", hashlib.sha256),
        ("md5 (hashlib)", hashlib.md5),
    ]
    if xxhash:
        algos += [("xxh3_64 (xxhash)", xxhash.xxh3_64), ("xxh3_128 (xxhash)", xxhash.xxh3_128)]
    rows = [("read only (8 MiB readinto)", best(lambda: stream(_Null()), n), nbytes)]
    for name, mk in algos:
        rows.append((name, best(lambda mk=mk: stream(mk()), n), nbytes))
    return rows


class _Null:
    def update(self, b):
        pass

    def digest(self):
        return b""


# --------------------------------------------------------------------------- main


def ms(s):
    return "—" if s is None else (f"{s * 1e3:.0f}" if s >= 0.01 else f"{s * 1e3:.2f}")


def run_dtype(dtype, base: Path, n: int, include_gz: bool):
    t0 = time.perf_counter()
    a = make_volume(dtype)
    print(
        f"# {dtype} volume {a.shape} {a.nbytes / 2**20:.0f} MiB made in "
        f"{time.perf_counter() - t0:.1f} s",
        file=sys.stderr,
    )
    rng = np.random.default_rng(1)
    rows = []
    paths = {}
    for f in formats(include_gz):
        k = f.get("repeat", n)
        if f.get("same_as"):
            p = paths[f["same_as"]]
            wt = None
        else:
            p = base / f"vol_{dtype}{f['suffix']}"
            paths[f["suffix"]] = p

            def w(f=f, p=p):
                rm(p)
                f["write"](a, p)

            try:
                wt = best(w, k)
                os.sync()  # no writeback in flight while reads are timed
            except Exception as e:
                print(f"# {f['name']}: write failed: {e!r}", file=sys.stderr)
                continue
        print(f"#   {f['name']} ...", file=sys.stderr)
        try:
            got = f["load_np"](p)  # warm the page cache and check the round trip
            g = np.asarray(got)
            g = g.T if f["suffix"].startswith(".nii") else g
            if g.shape != a.shape or not np.array_equal(g, a):
                raise AssertionError(f"round trip failed: {f['name']}")
            del got, g
            row = dict(
                name=f["name"],
                write=wt,
                size=size_of(p) if wt is not None else None,
                np=best(lambda f=f, p=p: f["load_np"](p), k),
                t=best(lambda f=f, p=p: f["load_t"](p), k),
            )
            row["sl"] = best_partial(f["slice"](p), rng, k) if f["slice"] else None
            row["pa"] = best_partial(f["patch"](p), rng, k) if f["patch"] else None
        except Exception as e:
            print(f"# {f['name']}: failed: {e!r}", file=sys.stderr)
            continue
        rows.append(row)
    # floors, on the .npy file once every format is done: one read() of its bytes into a
    # fresh array, and a copy of the array in memory
    npy = paths[".npy"]
    sz = npy.stat().st_size
    read_floor(npy, sz)
    rows[:0] = [
        dict(
            name="floor: one readinto() of the .npy bytes (page cache)",
            write=None,
            size=None,
            np=best(lambda: read_floor(npy, sz), n),
            t=None,
            sl=None,
            pa=None,
        ),
        dict(
            name="floor: in-memory copy (np.copy)",
            write=None,
            size=None,
            np=best(lambda: a.copy(), n),
            t=None,
            sl=None,
            pa=None,
        ),
    ]
    ck = checksums(npy, n)
    for p in paths.values():
        rm(p)
    return a.nbytes, rows, ck


def table(dtype, nbytes, rows, ck, n):
    ref = next(r["np"] for r in rows if r["name"].startswith(".npy (np.save"))
    print(
        f"\n### {dtype}, {SHAPE[2]}x{SHAPE[1]}x{SHAPE[0]} = {nbytes / 2**20:.0f} MiB in memory "
        f"(best of {n}; slice and {PATCH}^3 patch: median of 20 random positions, best of {n})\n"
    )
    print(
        "| format | write ms | size MiB | ratio | load → numpy ms | load → torch ms | "
        "x .npy load | GB/s | 1 slice ms | 96³ patch ms |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        size = "—" if r["size"] is None else f"{r['size'] / 2**20:.1f}"
        ratio = "—" if r["size"] is None else f"{nbytes / r['size']:.2f}"
        print(
            f"| {r['name']} | {ms(r['write'])} | {size} | {ratio} | {ms(r['np'])} | {ms(r['t'])} | "
            f"{r['np'] / ref:.2f} | {nbytes / r['np'] / 1e9:.1f} | {ms(r['sl'])} | {ms(r['pa'])} |"
        )
    print(
        f"\nChecksum of the {dtype} .npy file ({ck[0][2] / 2**20:.0f} MiB), streamed from the page "
        "cache in 8 MiB reads:\n"
    )
    print("| checksum | ms | GB/s |")
    print("|---|---:|---:|")
    for name, t, b in ck:
        print(f"| {name} | {ms(t)} | {b / t / 1e9:.1f} |")


def versions():
    out = [f"Python {platform.python_version()}", f"{platform.machine()} {os.cpu_count()} CPUs"]
    for p in (
        "numpy",
        "torch",
        "nibabel",
        "safetensors",
        "zarr",
        "numcodecs",
        "h5py",
        "xxhash",
        "monai",
    ):
        with contextlib.suppress(md.PackageNotFoundError):
            out.append(f"{p} {md.version(p)}")
    return ", ".join(out)


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--dtypes", default="int16,float32")
    ap.add_argument("--no-gz", action="store_true", help="skip .nii.gz (slow to write)")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    base_parent = args.dir or Path(__file__).resolve().parent / "out"
    base_parent.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="tensor_format_", dir=base_parent))
    print(f"Versions: {versions()}")
    print(
        f"Files in {base} ({os.statvfs(base).f_bsize} B blocks); page cache warm: each file is "
        "read once before timing; writes are timed to the page cache, then os.sync() untimed."
    )
    try:
        for i, dt in enumerate(args.dtypes.split(",")):
            nbytes, rows, ck = run_dtype(
                dt, base, args.repeat, include_gz=not args.no_gz and i == 0
            )
            table(dt, nbytes, rows, ck, args.repeat)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
