"""Open images as RGB, pad to square or resize + centre crop, normalise — fast, and equal to transformers.

The pipeline is split in two so that workers can hand over uint8 pixels:

* :meth:`ImageTransform.to_uint8` — decode-side work on a PIL image: optional pad to square with the mean
  colour (the original's ``expand2square``), resize (shortest edge, the processor's resampling), centre
  crop. Returns a ``(3, H, W)`` uint8 array.
* :meth:`ImageTransform.normalize` — rescale + normalise through a per-channel 256-entry lookup table
  computed with the same float operations as transformers (float64 rescale, float32 normalise), so the
  result is bit-identical to ``CLIPImageProcessorPil`` while costing one gather. Works on numpy or torch,
  on any device.

All parameters come from the vision tower's own image-processor config (size, crop, mean, std, resample).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

ImageFile.LOAD_TRUNCATED_IMAGES = False
BICUBIC = 3
SEPARABLE = (1, 2, 3, 4, 5)  # Pillow's LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING: resized in two passes


class ImageLoadError(OSError):
    """An image is missing or cannot be decoded."""


#: one pixel limit for every image llavakit opens (data check, training, chat, predict, serve, eval);
#: ``LLAVAKIT_MAX_IMAGE_PIXELS`` changes it. Checked from the header, before any pixel is decoded.
#: Pillow itself refuses images over twice its own limit (~179 million pixels) whatever this says.
MAX_PIXELS_ENV = "LLAVAKIT_MAX_IMAGE_PIXELS"
DEFAULT_MAX_PIXELS = 50_000_000


def max_image_pixels() -> int:
    value = os.environ.get(MAX_PIXELS_ENV)
    if not value:
        return DEFAULT_MAX_PIXELS
    try:
        limit = int(value)
    except ValueError:
        raise ValueError(f"{MAX_PIXELS_ENV}={value!r}: give a whole number of pixels") from None
    if limit <= 0:
        raise ValueError(f"{MAX_PIXELS_ENV}={value!r}: give a positive number of pixels")
    return limit


def open_image(source: str | os.PathLike | IO[bytes], name: str | None = None) -> Image.Image:
    """Open any common format as an RGB PIL image, from a path or a binary file object (``name`` says
    what it is in messages).

    Applies the EXIF orientation, takes the first frame of animations, composites transparency over white
    (as transformers' ``convert_to_rgb`` does), scales 16/32-bit greyscale to 8 bits, converts CMYK and
    palette images.
    """
    if not hasattr(source, "read"):
        source = name = str(source)
        if not os.path.exists(source):
            raise ImageLoadError(f"{source}: image file not found")
    path = name or "image"
    limit = max_image_pixels()
    try:
        with warnings.catch_warnings():  # the pixel limit below says it in one sentence
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im_cm = Image.open(source)
        with im_cm as im:
            w, h = im.size
            if w * h > limit:
                raise ImageLoadError(f"{path}: {w}x{h} = {w * h:,} pixels, over the limit of {limit:,} "
                                     f"({MAX_PIXELS_ENV} changes it); not decoded")
            im.seek(0)
            im.load()
            ImageOps.exif_transpose(im, in_place=True)  # no copy when there is nothing to turn
            return to_rgb(im)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f"{path}: over Pillow's own pixel limit ({e}); not decoded") from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"{path}: cannot decode image: not an image in a format Pillow reads") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageLoadError(f"{path}: cannot decode image: {e}") from None


#: EXIF orientations that turn the image by 90 degrees (width and height swap)
_TRANSPOSED = {5, 6, 7, 8}


def image_size(source: str | os.PathLike | IO[bytes], name: str | None = None) -> tuple[int, int]:
    """(height, width) of an image as :func:`open_image` returns it (EXIF orientation applied), read from the
    header alone: no pixel is decoded. ``source``: a path or a binary file object (``name`` says what it is)."""
    path = name or ("image" if hasattr(source, "read") else str(source))
    if not hasattr(source, "read") and not os.path.exists(path):
        raise ImageLoadError(f"{path}: image file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source if hasattr(source, "read") else path) as im:
                w, h = im.size
                orientation = im.getexif().get(0x0112, 1)
    except UnidentifiedImageError:
        raise ImageLoadError(f"{path}: cannot decode image: not an image in a format Pillow reads") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageLoadError(f"{path}: cannot read the image header: {e}") from None
    return (w, h) if orientation in _TRANSPOSED else (h, w)


def to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        if im.mode == "I" and arr.max() <= 65535:
            top = 65535.0 if arr.max() > 255 else 255.0
        im = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    has_alpha = "A" in im.getbands() or im.info.get("transparency") is not None
    if has_alpha:
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    return im.convert("RGB") if im.mode != "RGB" else im


def expand2square(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Pad to a square, image centred, with ``background`` (the original LLaVA's ``pad`` mode)."""
    w, h = im.size
    if w == h:
        return im
    side = max(w, h)
    out = Image.new(im.mode, (side, side), background)
    out.paste(im, ((side - w) // 2, (side - h) // 2))
    return out


def _get(cfg: Any, key: str, default=None):
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


@dataclass
class ImageTransform:
    """The vision tower's preprocessing, as a fast PIL + numpy path."""

    shortest_edge: int | None = 336
    size_hw: tuple[int, int] | None = None
    crop_hw: tuple[int, int] | None = (336, 336)
    resample: int = BICUBIC
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    aspect_ratio: str = "square"
    #: AnyRes geometry (``--image_aspect_ratio anyres``): an image becomes a base view and tiles
    anyres: Any = None

    def __post_init__(self):
        if self.aspect_ratio not in ("square", "pad", "anyres"):
            raise ValueError(f"--image_aspect_ratio {self.aspect_ratio!r} is not supported; use 'square', 'pad' "
                             "or 'anyres'")
        if (self.aspect_ratio == "anyres") != (self.anyres is not None):
            raise ValueError("aspect ratio 'anyres' goes with an AnyRes geometry, and only it")
        x = np.arange(256, dtype=np.uint8)
        lut = np.stack([x] * 3).astype(np.float32)
        if self.do_rescale:
            lut = (np.stack([x] * 3).astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            mean = np.asarray(self.image_mean, dtype=np.float32)
            std = np.asarray(self.image_std, dtype=np.float32)
            lut = ((lut.T - mean) / std).T
        self.lut = np.ascontiguousarray(lut, dtype=np.float32)
        self._lut_t = {}

    @classmethod
    def from_processor(cls, processor: Any, aspect_ratio: str = "square", anyres: Any = None) -> ImageTransform:
        """Build from a transformers image processor (object or its config dict); ``anyres`` (an
        :class:`~llavakit.data.anyres.AnyRes`) with ``aspect_ratio="anyres"``."""
        size = _get(processor, "size") or {}
        crop = _get(processor, "crop_size")
        size = dict(size) if not isinstance(size, int) else {"shortest_edge": size}
        crop = ({"height": crop, "width": crop} if isinstance(crop, int) else dict(crop)) if crop else None
        resample = _get(processor, "resample", BICUBIC)
        resample = int(resample) if resample is not None else BICUBIC
        return cls(
            shortest_edge=size.get("shortest_edge"),
            size_hw=(size["height"], size["width"]) if "height" in size else None,
            crop_hw=(crop["height"], crop["width"]) if crop else None,
            resample=resample,
            do_resize=bool(_get(processor, "do_resize", True)),
            do_center_crop=bool(_get(processor, "do_center_crop", bool(crop))),
            do_rescale=bool(_get(processor, "do_rescale", True)),
            rescale_factor=float(_get(processor, "rescale_factor", 1 / 255)),
            do_normalize=bool(_get(processor, "do_normalize", True)),
            image_mean=tuple(_get(processor, "image_mean", cls.image_mean)),
            image_std=tuple(_get(processor, "image_std", cls.image_std)),
            aspect_ratio=aspect_ratio,
            anyres=anyres,
        )

    @property
    def background(self) -> tuple[int, int, int]:
        return tuple(int(m * 255) for m in self.image_mean)

    @property
    def output_hw(self) -> tuple[int, int] | None:
        if self.do_center_crop and self.crop_hw:
            return self.crop_hw
        if self.size_hw:
            return self.size_hw
        return None

    def _resize_hw(self, h: int, w: int) -> tuple[int, int]:
        if self.size_hw:
            return self.size_hw
        s = self.shortest_edge
        if s is None:
            raise ValueError("image processor config has neither size.shortest_edge nor size.height/width")
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = s, int(s * long / short)
        return (new_long, new_short) if w <= h else (new_short, new_long)

    def views(self, im: Image.Image, n_images: int = 1) -> np.ndarray:
        """What the vision tower sees of one image of a sample with ``n_images``, as uint8 ``(V, 3, H, W)``: one
        view (LLaVA-1.5), or AnyRes's base view and tiles (each then resized and cropped as the processor does
        its views) — or, for OneVision's images of a multi-image sample, one view padded to a square."""
        if self.anyres is None:
            return self.to_uint8(im)[None]
        if self.anyres.single_view(n_images):
            return self.to_uint8(expand2square(im, self.background))[None]
        base_hw = self.size_hw or (self.shortest_edge, self.shortest_edge)
        return np.stack([self.to_uint8(v) for v in self.anyres.views(im, base_hw, self.resample)])

    def num_views(self, size_hw: tuple[int, int], n_images: int = 1) -> int:
        """Views of an image of this (height, width) in a sample with ``n_images``: 1, or AnyRes's."""
        return 1 if self.anyres is None else self.anyres.num_views(*size_hw, n_images)

    def to_uint8(self, im: Image.Image) -> np.ndarray:
        """Pad/resize/crop an RGB PIL image; return ``(3, H, W)`` uint8."""
        two_pass = self.resample in SEPARABLE and im.mode == "RGB"
        if self.aspect_ratio == "pad" and self.do_resize and im.width > im.height and two_pass:
            im = self._pad_rows_and_resize(im)
        else:
            if self.aspect_ratio == "pad":
                im = expand2square(im, self.background)
            if self.do_resize:
                h, w = self._resize_hw(im.height, im.width)
                crop_h, crop_w = self.crop_hw if self.do_center_crop and self.crop_hw else (h, w)
                # (Pillow runs the row pass first for an image at least as wide as tall; a tall one may be
                # resized columns first, so it takes the plain path)
                if two_pass and w > crop_w and h >= crop_h and im.width >= im.height:
                    im = self._resize_cutting_columns_first(im, h, w, crop_w)
                else:
                    im = im.resize((w, h), resample=self.resample)
        if self.do_center_crop and self.crop_hw:
            ch, cw = self.crop_hw
            top, left = (im.height - ch) // 2, (im.width - cw) // 2
            if top >= 0 and left >= 0:
                im = im.crop((left, top, left + cw, top + ch))
            else:
                from transformers.image_transforms import center_crop

                arr = center_crop(np.asarray(im).transpose(2, 0, 1), (ch, cw), input_data_format="channels_first")
                return np.ascontiguousarray(arr, dtype=np.uint8)
        return np.ascontiguousarray(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1))

    def _pad_rows_and_resize(self, im: Image.Image) -> Image.Image:
        """``expand2square`` then resize, for a wide image, without resampling the padding rows.

        Pillow resizes in two separable passes — every needed row horizontally into an 8-bit intermediate,
        then every column vertically (rows first whenever the height does not shrink more than twice as much
        as the width, as for a square) — with coefficients that depend only on the input and output sizes.
        A padding row is one colour, and a normalised filter maps a constant row to the same constant, so
        the horizontal pass can run on the image rows alone, the padding be added to the narrow result, and
        the vertical pass run on that: the same two passes on the same values, hence the same bytes (tested
        against the padded square over many sizes) at ~80% of the time for a 4:3 photo.
        """
        w, h = im.size
        th, tw = self._resize_hw(w, w)
        narrow = im.resize((tw, h), resample=self.resample) if tw != w else im
        canvas = Image.new("RGB", (tw, w), self.background)
        canvas.paste(narrow, (0, (w - h) // 2))
        return canvas.resize((tw, th), resample=self.resample) if th != w else canvas

    def _resize_cutting_columns_first(self, im: Image.Image, h: int, w: int, crop_w: int) -> Image.Image:
        """Resize to ``(h, w)`` with the columns that the centre crop drops cut away between Pillow's two
        passes: the horizontal pass as usual, the crop's columns, then the vertical pass on those alone. The
        vertical pass treats every column on its own with coefficients from the heights only, so the kept
        columns get the same bytes (tested), and a 4:3 photo skips a quarter of that pass. The rows are
        cropped afterwards, as before. Only for images at least as wide as tall: Pillow 13 resizes a tall
        image columns first when its height shrinks more than twice as much as its width."""
        wide = im.resize((w, im.height), resample=self.resample) if w != im.width else im
        left = (w - crop_w) // 2
        kept = wide.crop((left, 0, left + crop_w, im.height))
        return kept.resize((crop_w, h), resample=self.resample) if h != im.height else kept

    def normalize(self, pixels):
        """uint8 ``(..., 3, H, W)`` → float32, bit-identical to transformers' rescale + normalise."""
        try:
            import torch
        except ImportError:  # pragma: no cover - torch is a dependency
            torch = None
        if torch is not None and isinstance(pixels, torch.Tensor):
            key = str(pixels.device)
            if key not in self._lut_t:
                self._lut_t[key] = torch.from_numpy(self.lut).to(pixels.device)
            lut = self._lut_t[key]
            idx = pixels.long()
            out = torch.empty(pixels.shape, dtype=torch.float32, device=pixels.device)
            for c in range(3):
                out[..., c, :, :] = lut[c][idx[..., c, :, :]]
            return out
        pixels = np.asarray(pixels)
        out = np.empty(pixels.shape, dtype=np.float32)
        for c in range(3):
            np.take(self.lut[c], pixels[..., c, :, :], out=out[..., c, :, :])
        return out

    def __call__(self, im: Image.Image) -> np.ndarray:
        return self.normalize(self.to_uint8(im))

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_lut_t"] = {}
        return state
