"""Slide and raster readers behind one small interface (DESIGN.md §3).

Backends: OpenSlide for whole-slide formats (and tiled 8-bit RGB TIFFs that it detects), tifffile for
other (Geo)TIFF rasters of any dtype, Pillow for plain images. Every reader answers
`read_region(x, y, size, out_px)`: a square of `size` BASE pixels with top-left (x, y), resized to `out_px`
with one antialiased filter, `RESIZE_FILTER` = PIL BOX (area averaging). BOX is exact for the integer
factors 2^s of the magnification ladders and commutes with 2x2-mean pyramids, so reading through a pyramid
level gives what reading level 0 would give (tests/test_readers.py). Regions are read from the coarsest
pyramid level whose downsample is at most size/out_px (`SlideReader.best_level`), then resized with
sub-pixel exact geometry (PIL's `box`).

A corrupt, truncated or unsupported file raises `SlideError` with one line naming the file; nothing is
ever silently replaced (unlike the official loader's bare `except` + random re-draw,
official-implementation.md §2).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

RESIZE_FILTER = Image.Resampling.BOX  # area averaging, used for every resize in the data pipeline
WSI_SUFFIXES = {".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif"}
PLAIN_SUFFIXES = {".png", ".jpg", ".jpeg"}
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# ModelPixelScale, ModelTiepoint, ModelTransformation, GeoKeyDirectory
_GEOTIFF_TAGS = (33550, 33922, 34264, 34735)
_GDAL_NODATA = 42113
_CACHE_BYTES = 256 << 20  # tifffile levels up to this size (as uint8 RGB) are decoded once and kept in memory


class SlideError(ValueError):
    """A slide or raster that cannot be read; the message is one line naming the file and the reason."""


def _error(path, reason: str | BaseException) -> SlideError:
    if isinstance(reason, BaseException):
        reason = f"cannot read ({type(reason).__name__}: {reason})"
    return SlideError(" ".join(f"{path}: {reason}".split()))  # collapse library messages onto one line


def derive_base_mag(objective_power: float | None, mpp: float | None, override: float | None) -> float | None:
    """Objective power of level 0: the override, else the metadata, else 10 / mpp (10x ~ 1.0 um/px)."""
    if override is not None:
        return float(override)
    if objective_power is not None and objective_power > 0:
        return float(objective_power)
    if mpp is not None and mpp > 0:
        return 10.0 / mpp
    return None


def level_scales(level_dims) -> tuple[tuple[float, float], ...]:
    """Base pixels per level pixel (x, y) for each level, from the level sizes.

    Pyramids are made by integer downsampling with the level size rounded down or up (CMU-1: 32914 -> 8228),
    so when both sides fit `round(W0/WL)` that integer is the exact factor. OpenSlide's own single downsample
    (the mean of W0/WL and H0/HL) is off by up to half a level pixel at the far edge of the slide."""
    (w0, h0), scales = level_dims[0], []
    for w, h in level_dims:
        n = max(1, round(w0 / w))
        if w in (w0 // n, -(-w0 // n)) and h in (h0 // n, -(-h0 // n)):
            scales.append((float(n), float(n)))
        else:
            scales.append((w0 / w, h0 / h))
    return tuple(scales)


class SlideReader:
    """Base-level geometry, level selection and resizing; backends implement `_read_window` and `_close`."""

    backend = "?"

    def __init__(self, path: Path, level_dims, mpp: float | None, objective_power: float | None,
                 base_mag: float | None, kind: str, level_downsamples=None):
        self.path = path
        self.width, self.height = (int(v) for v in level_dims[0])
        self._level_dims = tuple((int(w), int(h)) for w, h in level_dims)
        self._scales = level_scales(self._level_dims)  # what the region geometry uses
        if level_downsamples is None:  # OpenSlide's convention: the mean of the two axes' ratios
            level_downsamples = [(self.width / w + self.height / h) / 2 for w, h in self._level_dims]
        self.level_downsamples = tuple(float(d) for d in level_downsamples)
        self.mpp = mpp
        self.base_mag = derive_base_mag(objective_power, mpp, base_mag)
        self.kind = kind                                 # "slide" (pads white) or "raster" (pads 0)
        self.pad_value = 255 if kind == "slide" else 0   # fill for regions partly outside the image

    def best_level(self, downsample: float) -> int:
        """Coarsest level whose downsample is <= `downsample` (the nearest finer level; level 0 if none).

        Downsamples here are the exact factors of `level_scales` (4 for 5934 -> 1483, where OpenSlide says
        4.0013), so a 4x request uses the 4x level."""
        best = 0
        for i, (sx, sy) in enumerate(self._scales):
            if max(sx, sy) <= downsample * (1 + 1e-9) and max(sx, sy) > max(self._scales[best]):
                best = i
        return best

    def read_region(self, x: int, y: int, size: int, out_px: int) -> np.ndarray:
        """uint8 (out_px, out_px, 3): the base-pixel square [x, x+size) x [y, y+size), resized with BOX."""
        if size <= 0 or out_px <= 0:
            raise ValueError(f"{self.path}: region size and out_px must be positive, got {size}, {out_px}")
        return self._read_rect(self.best_level(size / out_px), x, y, size, size, out_px, out_px)

    def thumbnail(self, max_side: int) -> tuple[np.ndarray, float]:
        """The whole image with its longer side at most `max_side`: (uint8 HxWx3, downsample vs. base)."""
        ds = max(1.0, max(self.width, self.height) / max_side)
        tw, th = max(1, round(self.width / ds)), max(1, round(self.height / ds))
        return self._read_rect(self.best_level(ds), 0, 0, self.width, self.height, tw, th), ds

    def _read_rect(self, level: int, x: float, y: float, w: float, h: float, out_w: int,
                   out_h: int) -> np.ndarray:
        sx, sy = self._scales[level]
        fx0, fy0, fx1, fy1 = x / sx, y / sy, (x + w) / sx, (y + h) / sy  # the rect in level coordinates
        # One spare pixel on each side: a backend may start the window up to half a pixel off (OpenSlide).
        lx0, ly0 = math.floor(fx0) - 1, math.floor(fy0) - 1
        win, ox, oy = self._read_window(level, lx0, ly0, math.ceil(fx1) - lx0 + 1, math.ceil(fy1) - ly0 + 1)
        box = (fx0 - ox, fy0 - oy, fx1 - ox, fy1 - oy)
        if all(float(b).is_integer() for b in box) and (box[2] - box[0], box[3] - box[1]) == (out_w, out_h):
            x0, y0, x1, y1 = (int(b) for b in box)
            return np.ascontiguousarray(win[y0:y1, x0:x1])  # 1:1, no resize
        return np.asarray(Image.fromarray(win).resize((out_w, out_h), RESIZE_FILTER, box=box))

    def _read_window(self, level: int, lx0: int, ly0: int, w: int, h: int) -> tuple[np.ndarray, float, float]:
        """uint8 (h, w, 3) at `level` from about (lx0, ly0), padded outside. Returns (array, origin_x,
        origin_y) with the exact level coordinates of the array's top-left corner."""
        raise NotImplementedError

    def _close(self) -> None:
        pass

    def close(self) -> None:
        self._close()

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({str(self.path)!r}, {self.width}x{self.height}, "
                f"levels={len(self.level_downsamples)}, base_mag={self.base_mag}, mpp={self.mpp}, "
                f"kind={self.kind})")


def _pad_window(arr_fn, shape_hw: tuple[int, int], lx0: int, ly0: int, w: int, h: int,
                pad: int) -> np.ndarray:
    """Window [ly0, ly0+h) x [lx0, lx0+w) of an image of shape_hw; arr_fn(ys, xs) reads the in-bounds part."""
    out = np.full((h, w, 3), pad, dtype=np.uint8)
    H, W = shape_hw
    y0, y1, x0, x1 = max(ly0, 0), min(ly0 + h, H), max(lx0, 0), min(lx0 + w, W)
    if y1 > y0 and x1 > x0:
        out[y0 - ly0:y1 - ly0, x0 - lx0:x1 - lx0] = arr_fn(slice(y0, y1), slice(x0, x1))
    return out


# ------------------------------------------------------------------------------------------------ OpenSlide
class OpenSlideReader(SlideReader):
    backend = "openslide"

    def __init__(self, path: Path, base_mag: float | None = None):
        import openslide

        self._errors = (openslide.OpenSlideError,)
        if _is_tiff(path):
            _check_tiff_extent(path)
        try:
            self._slide = openslide.OpenSlide(str(path))
        except openslide.OpenSlideError as e:
            raise _error(path, e) from e
        props = self._slide.properties
        mpps = [float(props[k]) for k in (openslide.PROPERTY_NAME_MPP_X, openslide.PROPERTY_NAME_MPP_Y)
                if k in props]
        power = props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER)
        super().__init__(path, self._slide.level_dimensions, float(np.mean(mpps)) if mpps else None,
                         float(power) if power else None, base_mag, kind="slide",
                         level_downsamples=self._slide.level_downsamples)

    def _read_window(self, level, lx0, ly0, w, h):
        ds = self.level_downsamples[level]
        out = np.full((h, w, 3), self.pad_value, dtype=np.uint8)
        (W, H), ox, oy = self._level_dims[level], float(lx0), float(ly0)
        x0, y0, x1, y1 = max(lx0, 0), max(ly0, 0), min(lx0 + w, W), min(ly0 + h, H)
        if x1 <= x0 or y1 <= y0:
            return out, ox, oy
        # OpenSlide maps a level-0 location to level coordinates as location / downsample and renders
        # fractional positions bilinearly (but truncates negative ones, hence only in-bounds reads): ask for
        # the level-0 pixel nearest to (x0, y0) and report where the window really starts.
        loc = (round(x0 * ds), round(y0 * ds))
        try:
            rgba = np.array(self._slide.read_region(loc, level, (x1 - x0, y1 - y0)))  # (h', w', 4)
        except self._errors as e:
            raise _error(self.path, e) from e
        rgb, clear = rgba[..., :3], rgba[..., 3] < 255
        if clear.any():  # composite transparent pixels (missing tiles, the far edge) onto the pad colour
            a = rgba[..., 3][clear][:, None].astype(np.uint16)
            rgb[clear] = (rgb[clear] * a + self.pad_value * (255 - a) + 127) // 255
        out[y0 - ly0:y1 - ly0, x0 - lx0:x1 - lx0] = rgb
        return out, loc[0] / ds - (x0 - lx0), loc[1] / ds - (y0 - ly0)

    def _close(self):
        self._slide.close()


# ------------------------------------------------------------------------------------------------- tifffile
class TiffReader(SlideReader):
    """(Geo)TIFF rasters of any dtype through tifffile + zarr, using the series' pyramid levels when present.

    Bands: the first 3 are RGB (4-band RGBN -> RGB; 1 band -> grey). Non-uint8 data is stretched to uint8 with
    per-band 1st-99th percentiles of the valid pixels, computed once per slide; valid pixels map to 1..255 and
    nodata pixels (all bands == GDAL_NODATA, else 0) to 0, so `masks.valid_mask(rgb, 0)` finds them.
    """

    backend = "tifffile"

    def __init__(self, path: Path, base_mag: float | None = None):
        import tifffile
        import zarr

        _check_tiff_extent(path)
        self._tf = None
        try:
            self._tf = tifffile.TiffFile(path)
            series = self._tf.series[0]
            page = series.pages[0] if series.pages else self._tf.pages[0]
            self._levels = [zarr.open_array(store=self._tf.aszarr(series=0, level=i), mode="r")
                            for i in range(len(series.levels))]
            axes = series.axes
            if axes not in ("YX", "YXS") and not (len(axes) == 3 and axes.endswith("YX")):
                raise ValueError(f"unsupported TIFF layout (axes {axes!r}; need YX, YXS or band-first ?YX)")
        except (tifffile.TiffFileError, OSError, ValueError, KeyError, IndexError, RuntimeError) as e:
            if self._tf is not None:
                self._tf.close()
            raise _error(path, e) from e
        self._band_last = axes == "YXS"
        self._shapes = [self._hw(z.shape) for z in self._levels]
        nbands = 1 if axes == "YX" else (series.shape[-1] if self._band_last else series.shape[0])
        self._bands = min(3, nbands)
        is_geo = any(t in page.tags for t in _GEOTIFF_TAGS)
        self._nodata = _gdal_nodata(page)
        self._stretch = series.dtype != np.uint8
        kind = "raster" if is_geo or self._stretch or nbands != 3 else "slide"
        mpp, power = (None, None) if is_geo else _tiff_mpp_power(page)
        super().__init__(path, [(w, h) for h, w in self._shapes], mpp, power, base_mag, kind)
        self._lo = self._hi = None
        self._cache: dict[int, np.ndarray] = {}
        if self._stretch:
            self._lo, self._hi = self._percentiles()

    def _hw(self, shape) -> tuple[int, int]:
        return tuple(shape[:2]) if self._band_last or len(shape) == 2 else tuple(shape[1:])

    def _raw(self, level: int, ys: slice, xs: slice) -> np.ndarray:
        """(h, w, bands) in the file's dtype, first 3 bands only."""
        z = self._levels[level]
        try:
            if z.ndim == 2:
                return np.asarray(z[ys, xs])[..., None]
            if self._band_last:
                return np.asarray(z[ys, xs, :self._bands])
            return np.moveaxis(np.asarray(z[:self._bands, ys, xs]), 0, -1)
        except (OSError, ValueError, KeyError, RuntimeError) as e:  # imagecodecs errors are RuntimeErrors
            raise _error(self.path, e) from e

    def _percentiles(self) -> tuple[np.ndarray, np.ndarray]:
        level = len(self._levels) - 1
        h, w = self._shapes[level]
        step = max(1, math.ceil(math.sqrt(h * w / 4e6)))  # at most ~4 M pixels for the statistics
        raw = self._raw(level, slice(0, h, step), slice(0, w, step)).reshape(-1, self._bands)
        raw = raw.astype(np.float64)
        raw = raw[~(raw == self._nodata).all(axis=1)]
        if not len(raw):
            return np.zeros(self._bands), np.ones(self._bands)  # no valid pixels: masks.build_mask reports it
        lo, hi = np.percentile(raw, [1, 99], axis=0)
        return lo, np.maximum(hi, lo + 1e-6)

    def _to_uint8(self, raw: np.ndarray) -> np.ndarray:
        nodata = (raw == self._nodata).all(axis=-1)
        if self._stretch:
            out = np.clip((raw - self._lo) / (self._hi - self._lo) * 254 + 1, 1, 255).round().astype(np.uint8)
        else:
            out = raw.astype(np.uint8, copy=True)
        out[nodata] = 0
        return out if out.shape[-1] == 3 else out[..., [0, 0, 0]]  # 1- or 2-band: the first band as grey

    def _read_window(self, level, lx0, ly0, w, h):
        full = self._cache.get(level)
        if full is None and np.prod(self._shapes[level]) * 3 <= _CACHE_BYTES:  # decode small levels once
            full = self._cache[level] = self._to_uint8(self._raw(level, slice(None), slice(None)))
        if full is not None:
            read = lambda ys, xs: full[ys, xs]  # noqa: E731
        else:
            read = lambda ys, xs: self._to_uint8(self._raw(level, ys, xs))  # noqa: E731
        return _pad_window(read, self._shapes[level], lx0, ly0, w, h, self.pad_value), lx0, ly0

    def _close(self):
        self._tf.close()


def _gdal_nodata(page) -> float:
    """The GDAL_NODATA tag (an ASCII number), else 0."""
    tag = page.tags.get(_GDAL_NODATA)
    try:
        return float(str(tag.value).strip("\x00 ")) if tag is not None else 0.0
    except ValueError:
        log.warning("ignoring unparsable GDAL_NODATA %r", tag.value)
        return 0.0


def _tiff_mpp_power(page) -> tuple[float | None, float | None]:
    """mpp and objective power from Aperio metadata, else from the resolution tags (cm or inch)."""
    if page.description.startswith("Aperio"):  # "Aperio Image Library ...|AppMag = 20|MPP = 0.499|..."
        meta = dict(kv.split("=", 1) for kv in page.description.split("|")[1:] if "=" in kv)
        meta = {k.strip(): v.strip() for k, v in meta.items()}
        mpp, power = meta.get("MPP"), meta.get("AppMag")
        try:
            return (float(mpp) if mpp else None), (float(power) if power else None)
        except ValueError:
            return None, None
    unit = int(page.resolutionunit)
    xres = page.resolution[0]
    if xres and unit in (2, 3):  # 2 = inch, 3 = centimetre; 1 (none) says nothing about physical size
        return (25400.0 if unit == 2 else 1e4) / xres, None
    return None, None


# --------------------------------------------------------------------------------------------------- Pillow
class PillowReader(SlideReader):
    backend = "pillow"

    def __init__(self, path: Path, base_mag: float | None = None):
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None  # large plain images (Blue Marble) are expected here; restored below
        try:
            with Image.open(path) as im:
                im.load()
                if im.mode.startswith(("I", "F")):  # 16/32-bit grey: stretch like a raster
                    raw = np.asarray(im, dtype=np.float64)
                    lo, hi = np.percentile(raw, [1, 99])
                    grey = np.clip((raw - lo) / max(hi - lo, 1e-6) * 255, 0, 255).round().astype(np.uint8)
                    self._arr = np.repeat(grey[..., None], 3, axis=-1)
                else:
                    self._arr = np.asarray(im.convert("RGB"))
        except (OSError, ValueError, SyntaxError) as e:  # UnidentifiedImageError and truncation are OSErrors
            raise _error(path, e) from e
        finally:
            Image.MAX_IMAGE_PIXELS = old
        h, w = self._arr.shape[:2]
        super().__init__(path, [(w, h)], None, None, base_mag, kind="slide")

    def _read_window(self, level, lx0, ly0, w, h):
        return _pad_window(lambda ys, xs: self._arr[ys, xs], self._arr.shape[:2], lx0, ly0, w, h,
                           self.pad_value), lx0, ly0


# -------------------------------------------------------------------------------------------------- opening
def _is_tiff(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) in _TIFF_MAGIC


def _check_tiff_extent(path: Path) -> None:
    """Raise SlideError when any strip/tile of any page lies beyond the end of the file (truncated copy)."""
    import tifffile

    size = path.stat().st_size
    errors = _ErrorLog()  # tifffile logs (does not raise) a page chain pointing past the end of the file
    logging.getLogger("tifffile").addHandler(errors)
    try:
        with tifffile.TiffFile(path) as tf:
            end = max((o + c for p in tf.pages for o, c in zip(p.dataoffsets, p.databytecounts) if c),
                      default=0)
    except (tifffile.TiffFileError, OSError, ValueError, KeyError, IndexError, RuntimeError) as e:
        raise _error(path, e) from e
    finally:
        logging.getLogger("tifffile").removeHandler(errors)
    if end > size:
        raise _error(path, f"truncated: image data runs to byte {end} but the file has {size} bytes")
    if errors.messages:
        raise _error(path, f"corrupt or truncated TIFF ({errors.messages[0]})")


class _ErrorLog(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _openslide_tiff(path: Path) -> bool:
    """True for a tiled 8-bit RGB TIFF without GeoTIFF tags that OpenSlide detects (a slide, not a raster).
    OpenSlide would also 'open' uint16 or 4-band rasters through libtiff's RGBA path, wrongly."""
    import openslide
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            p = tf.pages[0]
            ok = (p.is_tiled and p.dtype == np.uint8 and p.samplesperpixel == 3
                  and int(p.photometric) in (2, 6)  # RGB or YCbCr
                  and not any(t in p.tags for t in _GEOTIFF_TAGS))
    except (tifffile.TiffFileError, OSError, ValueError, KeyError, IndexError):
        return False  # let the tifffile reader report the problem
    return ok and openslide.OpenSlide.detect_format(str(path)) is not None


_BACKENDS = {"openslide": OpenSlideReader, "tifffile": TiffReader, "pillow": PillowReader}


def choose_backend(path: str | Path) -> str:
    """The backend `open_slide(..., backend="auto")` uses for this file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in WSI_SUFFIXES:
        return "openslide"
    if suffix in PLAIN_SUFFIXES:
        return "pillow"
    if _is_tiff(path):
        return "openslide" if _openslide_tiff(path) else "tifffile"
    import openslide
    return "openslide" if openslide.OpenSlide.detect_format(str(path)) else "pillow"


def open_slide(path: str | Path, base_mag: float | None = None, backend: str = "auto") -> SlideReader:
    """Open a slide or raster; `base_mag` overrides the objective power found in (or derived from) metadata.
    backend: "auto" (see `choose_backend`), "openslide", "tifffile" or "pillow"."""
    path = Path(path)
    if not path.exists():
        raise SlideError(f"{path}: no such file")
    if not path.is_file():
        raise SlideError(f"{path}: not a file")
    if backend == "auto":
        backend = choose_backend(path)
    if backend not in _BACKENDS:
        raise ValueError(f"unknown reader backend {backend!r}; choose auto, {', '.join(_BACKENDS)}")
    reader = _BACKENDS[backend](path, base_mag)
    log.debug("opened %r", reader)
    return reader
