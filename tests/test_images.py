"""Image opening and the fast transform against transformers' CLIPImageProcessorPil."""

import numpy as np
import pytest
import torch
from PIL import Image

from llavakit.data.images import ImageLoadError, ImageTransform, expand2square, open_image

from .conftest import make_image


@pytest.fixture(scope="module")
def clip_proc():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})


@pytest.mark.parametrize("size", [(64, 48), (40, 90), (56, 56), (33, 200), (300, 301)])
def test_square_mode_bit_identical_to_processor(tmp_path, clip_proc, size):
    p = make_image(tmp_path / "x.jpg", size, seed=sum(size))
    im = open_image(p)
    ours = ImageTransform.from_processor(clip_proc)(im)
    ref = clip_proc(images=im, return_tensors="np")["pixel_values"][0]
    assert ours.dtype == np.float32 and ours.shape == ref.shape == (3, 56, 56)
    assert np.array_equal(ours, ref)


def test_pad_mode_is_expand2square_with_mean_colour_then_processor(tmp_path, clip_proc):
    im = open_image(make_image(tmp_path / "x.png", (80, 30), seed=5))
    t = ImageTransform.from_processor(clip_proc, aspect_ratio="pad")
    assert t.background == (122, 116, 104)
    padded = expand2square(im, t.background)
    assert padded.size == (80, 80)
    assert padded.getpixel((0, 0)) == (122, 116, 104)
    ref = clip_proc(images=padded, return_tensors="np")["pixel_values"][0]
    assert np.array_equal(t(im), ref)


def test_torch_normalisation_matches_numpy(tmp_path, clip_proc):
    t = ImageTransform.from_processor(clip_proc)
    u8 = t.to_uint8(open_image(make_image(tmp_path / "x.jpg", (70, 50))))
    assert u8.dtype == np.uint8
    batch = torch.from_numpy(np.stack([u8, u8]))
    out = t.normalize(batch)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 56, 56)
    assert np.array_equal(out[1].numpy(), t.normalize(u8))


def test_uses_the_processor_config_not_clip_constants():
    t = ImageTransform.from_processor({"size": {"height": 32, "width": 32}, "do_center_crop": False,
                                       "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                                       "resample": 2})
    im = Image.new("RGB", (50, 20), (255, 0, 0))
    out = t(im)
    assert out.shape == (3, 32, 32)
    assert np.allclose(out[0], 1.0) and np.allclose(out[1], -1.0)
    assert t.background == (127, 127, 127)


@pytest.mark.parametrize("mode,fmt", [("P", "PNG"), ("RGBA", "PNG"), ("L", "JPEG"), ("CMYK", "JPEG"),
                                      ("LA", "PNG"), ("1", "BMP"), ("RGB", "WEBP"), ("RGB", "TIFF")])
def test_open_any_mode_as_rgb(tmp_path, mode, fmt):
    p = make_image(tmp_path / f"x.{fmt.lower()}", (20, 10), mode=mode, fmt=fmt)
    im = open_image(p)
    assert im.mode == "RGB" and im.size == (20, 10)


def test_transparency_composited_on_white(tmp_path):
    im = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    im.save(tmp_path / "t.png")
    assert open_image(tmp_path / "t.png").getpixel((0, 0)) == (255, 255, 255)


def test_16_bit_greyscale_scaled(tmp_path):
    arr = np.full((4, 4), 65535, dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "g.png")
    assert open_image(tmp_path / "g.png").getpixel((0, 0)) == (255, 255, 255)


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 0, 255)]]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    r, g, b = open_image(tmp_path / "a.gif").getpixel((0, 0))
    assert r > 200 and b < 50


def test_exif_rotation_applied(tmp_path):
    im = Image.new("RGB", (30, 10), (0, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    im.save(tmp_path / "r.jpg", exif=exif)
    assert open_image(tmp_path / "r.jpg").size == (10, 30)


def test_missing_and_corrupt_images_raise_image_load_error(tmp_path):
    with pytest.raises(ImageLoadError, match="not found"):
        open_image(tmp_path / "nope.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"not an image at all")
    with pytest.raises(ImageLoadError, match="cannot decode"):
        open_image(tmp_path / "bad.jpg")
    good = make_image(tmp_path / "t.jpg", (64, 64)).read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(good[: len(good) // 2])
    with pytest.raises(ImageLoadError):
        open_image(tmp_path / "trunc.jpg")


@pytest.mark.parametrize("resample", [Image.BICUBIC, Image.BILINEAR, Image.LANCZOS, Image.BOX])
def test_pad_mode_fast_path_is_byte_identical_to_padding_first(resample):
    """Wide images skip resampling their padding rows; every size must give the bytes of the padded square."""
    rng = np.random.default_rng(resample)
    sizes = [(640, 480), (640, 427), (500, 375), (641, 480), (337, 336), (1024, 17), (57, 56), (60, 2),
             (336, 200), (100, 99)] + [(int(w), int(rng.integers(1, w))) for w in rng.integers(20, 900, 40)]
    for edge in (56, 336):
        t = ImageTransform(shortest_edge=edge, crop_hw=(edge, edge), resample=resample, aspect_ratio="pad")
        for w, h in sizes:
            im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            im.paste(tuple(int(c) for c in rng.integers(0, 256, 3)), (0, 0, max(1, w // 4), h))  # flat areas
            padded = expand2square(im, t.background).resize((edge, edge), resample=resample)
            ref = np.asarray(padded).transpose(2, 0, 1)
            assert np.array_equal(t.to_uint8(im), ref), (edge, w, h)


def test_input_path_benchmark_runs_and_both_paths_give_the_same_pixels():
    import json
    import subprocess
    import sys

    from .conftest import REPO

    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "input_path.py"), "--n", "16", "--repeats", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["same_pixels"] is True and out["n"] == 16
    assert out["llavakit_samples_per_second"] > 0 and out["original_samples_per_second"] > 0


@pytest.mark.parametrize("resample", [Image.BICUBIC, Image.BILINEAR, Image.LANCZOS, Image.BOX])
def test_square_mode_fast_path_is_byte_identical_to_resize_then_crop(resample):
    """Wide images lose the cropped columns between the two resize passes; every size must give the bytes
    of a plain resize then centre crop (crop narrower than the short edge too: rows cropped as well)."""
    rng = np.random.default_rng(10 + resample)
    sizes = [(640, 480), (640, 427), (500, 375), (337, 336), (1024, 17), (57, 56), (60, 2), (100, 99),
             (480, 640), (300, 300)] + [(int(w), int(rng.integers(1, w + 200))) for w in rng.integers(20, 900, 30)]
    for edge, crop in ((56, 56), (336, 336), (64, 56)):
        t = ImageTransform(shortest_edge=edge, crop_hw=(crop, crop), resample=resample)
        for w, h in sizes:
            im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            rh, rw = t._resize_hw(h, w)
            full = im.resize((rw, rh), resample=resample)
            top, left = (rh - crop) // 2, (rw - crop) // 2
            ref = np.asarray(full.crop((left, top, left + crop, top + crop))).transpose(2, 0, 1)
            assert np.array_equal(t.to_uint8(im), ref), (edge, crop, w, h)
