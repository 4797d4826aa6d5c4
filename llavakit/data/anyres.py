"""AnyRes (LLaVA-NeXT's ``--image_aspect_ratio anyres``, LLaVA-OneVision's ``anyres_max_N``): an image
becomes a base view (the whole image resized to the tower's input) plus a grid of tiles cut from it at a
resolution chosen from ``--image_grid_pinpoints``; its features are unpadded (OneVision: and pooled when
there are too many) and end every row with a newline embedding.

Two things follow from an image's size alone, before any pixel is decoded: how many tiles it gives, and how
many image tokens it becomes — computed as transformers' ``LlavaNextProcessor`` / ``LlavaOnevisionProcessor``
and their image processors compute them (tests compare), so that training ids equal the ids a saved model's
``AutoProcessor`` builds. :meth:`AnyRes.views` cuts the tiles as uint8, byte-equal to the image processors'
before their rescale and normalise (which :class:`ImageTransform.normalize` does on the device, as for
LLaVA-1.5).
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass

from PIL import Image

#: LLaVA-NeXT's (llava-v1.6) grid for a 336-px tower: 1×2, 2×1, 2×2, 3×1, 1×3 tiles
LLAVA_NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


class AnyResError(ValueError):
    """``--image_grid_pinpoints`` or an AnyRes setting cannot be used."""


def max_tiles_of(aspect_ratio: str) -> int | None:
    """``anyres_max_9`` → 9; ``anyres`` → None (LLaVA-NeXT: no pooling)."""
    if aspect_ratio == "anyres":
        return None
    tail = aspect_ratio[len("anyres_max_"):] if aspect_ratio.startswith("anyres_max_") else ""
    if not tail.isdigit() or int(tail) < 1:
        raise AnyResError(f"--image_aspect_ratio {aspect_ratio!r}: use anyres or anyres_max_N (N tiles, e.g. 9)")
    return int(tail)


def parse_grid_pinpoints(value, tile: int) -> tuple[tuple[int, int], ...]:
    """``--image_grid_pinpoints`` in any of the original's spellings → ((height, width), ...) in pixels.

    * a list of [height, width] pairs, or its text (``"[[336, 672], [672, 336]]"``);
    * a range of tile grids, ``"(1x1),...,(3x3)"`` (LLaVA-OneVision's): every grid from the first to the
      last, times the tile side;
    * ``None``: LLaVA-NeXT's five grids for a 336-px tower, scaled to ``tile``.
    Every resolution must be a whole number of tiles.
    """
    if value is None or value == "":
        pairs = [(h * tile // 336, w * tile // 336) for h, w in LLAVA_NEXT_PINPOINTS]
    elif isinstance(value, str) and "x" in value:
        grids = re.findall(r"\((\d+)\s*x\s*(\d+)\)", value)
        if not grids:
            raise AnyResError(f"--image_grid_pinpoints {value!r}: expected a range like '(1x1),...,(3x3)'")
        (r0, c0), (r1, c1) = (tuple(map(int, g)) for g in (grids[0], grids[-1]))
        pairs = [(r * tile, c * tile) for r in range(r0, r1 + 1) for c in range(c0, c1 + 1)]
    else:
        if isinstance(value, str):
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                raise AnyResError(f"--image_grid_pinpoints {value!r}: not a list of [height, width] pairs "
                                  "nor a range like '(1x1),...,(3x3)'") from None
        try:
            pairs = [(int(h), int(w)) for h, w in value]
        except (TypeError, ValueError):
            raise AnyResError(f"--image_grid_pinpoints {value!r}: not a list of [height, width] pairs") from None
    if not pairs:
        raise AnyResError("--image_grid_pinpoints is empty")
    bad = [p for p in pairs if p[0] <= 0 or p[1] <= 0 or p[0] % tile or p[1] % tile]
    if bad:
        raise AnyResError(f"--image_grid_pinpoints: {bad[0][0]}x{bad[0][1]} is not a whole number of "
                          f"{tile}-pixel tiles (the vision tower's input side)")
    return tuple(pairs)


def best_resolution(height: int, width: int, pinpoints) -> tuple[int, int]:
    """The pinpoint that keeps the most of the image's pixels when it is scaled to fit, and wastes the
    least; the first such one on ties (transformers' ``select_best_resolution``)."""
    best, best_kept, best_waste = None, 0, math.inf
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        waste = ph * pw - kept
        if kept > best_kept or (kept == best_kept and waste < best_waste):
            best, best_kept, best_waste = (ph, pw), kept, waste
    return best


def fitted_size(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    """The size an image is resized to inside a ``target`` resolution, aspect ratio kept."""
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


@dataclass(frozen=True)
class AnyRes:
    """AnyRes geometry for one vision tower: ``tile`` is its input side, ``patch`` its patch side.

    ``max_tiles`` (LLaVA-OneVision's ``anyres_max_N``): the unpadded tile features are pooled down to about N
    tiles' worth when they hold more than 1.1² times that, and an image of a sample with several images is a
    single view, padded to a square, plus one newline.
    """

    pinpoints: tuple[tuple[int, int], ...]
    tile: int
    patch: int
    newline: bool = True
    max_tiles: int | None = None

    @property
    def tile_tokens(self) -> int:
        return (self.tile // self.patch) ** 2

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Tile rows and columns for an image of this size."""
        h, w = best_resolution(height, width, self.pinpoints)
        return h // self.tile, w // self.tile

    def single_view(self, n_images: int) -> bool:
        """Whether each of a sample's ``n_images`` images is one padded view (OneVision, several images)."""
        return self.max_tiles is not None and n_images > 1

    def num_views(self, height: int, width: int, n_images: int = 1) -> int:
        """The base view and the tiles (one view: see :meth:`single_view`)."""
        if self.single_view(n_images):
            return 1
        rows, cols = self.grid(height, width)
        return 1 + rows * cols

    def num_tokens(self, height: int, width: int, n_images: int = 1) -> int:
        """Image tokens for an image of this size: the base view's patches, then the tiles' patch grid with
        the padding rows or columns (that the aspect-ratio fit added) removed (and, with ``max_tiles``,
        pooled), and a newline per row. ``n_images``: how many images the sample holds."""
        if self.single_view(n_images):
            return self.tile_tokens + 1
        rows, cols = self.grid(height, width)
        side = self.tile // self.patch
        cur_h, cur_w = side * rows, side * cols
        if width / height > cur_w / cur_h:
            new_h = int(round(height * (cur_w / width), 7))
            cur_h -= (cur_h - new_h) // 2 * 2
        else:
            new_w = int(round(width * (cur_h / height), 7))
            cur_w -= (cur_w - new_w) // 2 * 2
        if self.max_tiles is not None:
            ratio = math.sqrt(cur_h * cur_w / (self.max_tiles * side ** 2))
            if ratio > 1.1:
                cur_h, cur_w = int(cur_h // ratio), int(cur_w // ratio)
        return self.tile_tokens + cur_h * cur_w + (cur_h if self.newline else 0)

    def views(self, im: Image.Image, base_hw: tuple[int, int], resample: int) -> list[Image.Image]:
        """The base view (``im`` resized to ``base_hw``) and the tiles, left to right, top to bottom, of
        ``im`` fitted into its best resolution and centred on black (the views an image alone in its sample
        gets; :meth:`single_view` images are the tower's padded square)."""
        width, height = im.size
        th, tw = best_resolution(height, width, self.pinpoints)
        nh, nw = fitted_size(height, width, th, tw)
        fitted = im.resize((nw, nh), resample=resample) if (nw, nh) != im.size else im
        canvas = Image.new("RGB", (tw, th), (0, 0, 0))
        canvas.paste(fitted, ((tw - nw) // 2, (th - nh) // 2))
        base = im.resize((base_hw[1], base_hw[0]), resample=resample)
        t = self.tile
        return [base] + [canvas.crop((x, y, x + t, y + t)) for y in range(0, th, t) for x in range(0, tw, t)]

    @property
    def aspect_ratio(self) -> str:
        """The original's ``image_aspect_ratio`` for this geometry: ``anyres`` or ``anyres_max_N``."""
        return "anyres" if self.max_tiles is None else f"anyres_max_{self.max_tiles}"

    def describe(self) -> str:
        return f"{self.aspect_ratio} tile {self.tile} patch {self.patch} pinpoints " \
            f"{list(map(list, self.pinpoints))}" + ("" if self.newline else " no-newline")

