"""Robust image loading: every Pillow mode, EXIF orientation, tiny/extreme images, and typed errors
for truncated, non-image, bomb-sized, missing and unreachable inputs — through load_image and both
preprocessors."""
from __future__ import annotations

import errno
import http.server
import io
import os
import struct
import threading
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from navil_utils.errors import ImageLoadError, ImageNotFoundError, ImageTimeoutError
from navil_utils.processing.image_io import (
    DEFAULT_MAX_IMAGE_PIXELS,
    load_image,
    make_test_pattern,
    to_rgb,
)
from navil_utils.processing.multiscale import preprocess_multiscale
from navil_utils.processing.tiling import preprocess_tiles

SMALL = dict(min_pixels=12 * 256, max_pixels=48 * 256)


def _rgba_with_alpha_ramp() -> Image.Image:
    rgba = np.zeros((4, 6, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red-ish colour everywhere
    rgba[..., 1] = 40
    rgba[..., 2] = 10
    rgba[..., 3] = np.array([0, 51, 102, 153, 204, 255], dtype=np.uint8)[None, :]
    return Image.fromarray(rgba)


def _expected_on_white(rgba: np.ndarray) -> np.ndarray:
    """Alpha compositing on opaque white (Pillow's integer rounding: within 1 level)."""
    alpha = rgba[..., 3:4].astype(np.float64) / 255
    return rgba[..., :3] * alpha + 255 * (1 - alpha)


def test_rgb_is_returned_unchanged():
    image = make_test_pattern(20, 30)
    loaded = load_image(image)
    assert loaded.mode == "RGB" and np.array_equal(np.asarray(loaded), np.asarray(image))


def test_rgba_is_composited_on_white():
    image = _rgba_with_alpha_ramp()
    loaded = np.asarray(load_image(image)).astype(np.float64)
    expected = _expected_on_white(np.asarray(image))
    assert np.abs(loaded - expected).max() <= 1.0
    assert np.all(loaded[:, 0] == 255) and np.all(loaded[:, -1] == [200, 40, 10])  # α=0 → white, α=255 → colour


def test_la_is_composited_on_white():
    la = Image.fromarray(np.stack([np.full((3, 3), 0, np.uint8), np.array([[0, 128, 255]] * 3, np.uint8)], -1), "LA")
    loaded = np.asarray(load_image(la))
    assert loaded.shape == (3, 3, 3)
    assert np.all(loaded[:, 0] == 255) and np.all(loaded[:, 2] == 0) and np.all(np.abs(loaded[:, 1].astype(int) - 127) <= 1)


def test_palette_with_and_without_transparency(tmp_path):
    palette_image = Image.new("P", (4, 2))
    palette_image.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    palette_image.putdata([0, 1, 0, 1, 1, 0, 1, 0])
    opaque = np.asarray(load_image(palette_image))
    assert opaque[0, 0].tolist() == [255, 0, 0] and opaque[0, 1].tolist() == [0, 0, 255]
    path = tmp_path / "transparent.png"
    palette_image.save(path, transparency=1)  # index 1 (blue) is transparent
    loaded = np.asarray(load_image(path))
    assert loaded[0, 0].tolist() == [255, 0, 0] and loaded[0, 1].tolist() == [255, 255, 255]


def test_greyscale_one_bit_and_cmyk():
    grey = Image.fromarray(np.array([[0, 100, 255]], np.uint8))
    assert np.asarray(load_image(grey)).tolist() == [[[0] * 3, [100] * 3, [255] * 3]]
    bits = Image.fromarray(np.array([[True, False]]))
    assert bits.mode == "1"
    assert np.asarray(load_image(bits)).tolist() == [[[255] * 3, [0] * 3]]
    cmyk = Image.new("CMYK", (2, 2), (255, 0, 0, 0))  # full cyan → no red
    assert np.asarray(load_image(cmyk))[0, 0].tolist() == [0, 255, 255]


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535], [128, 129, 1000, 60000]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    reopened = Image.open(path)
    assert reopened.mode.startswith("I")  # Pillow opens 16-bit greyscale PNG as I;16 / I
    loaded = np.asarray(load_image(path))
    assert loaded[..., 0].tolist() == np.rint(values / 257).astype(int).tolist()
    assert np.all(loaded[..., 0] == loaded[..., 2])
    assert np.asarray(load_image(values))[..., 1].tolist() == loaded[..., 1].tolist()  # uint16 arrays too


def test_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = (255, 0, 0)  # red left half, blue right half (as stored)
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, exif=exif.tobytes(), quality=95)
    loaded = load_image(path)
    assert loaded.size == (20, 40)  # width and height swapped
    pixels = np.asarray(loaded).astype(int)
    top, bottom = pixels[5, 10], pixels[35, 10]  # stored left (red) is now on top
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60


def test_one_pixel_image_through_both_preprocessors():
    pixel = Image.new("RGB", (1, 1), (12, 34, 56))
    multi = preprocess_multiscale(pixel, **SMALL)
    # 1×1 is grown to the min budget: β = √3072 → 56×56 → padded 64×64 → one scale of 4×4 patches
    assert multi.image_grid_thw.tolist() == [[1, 4, 4]] and multi.scales[0].resized_hw == (56, 56)
    from navil_utils.reference.preprocessing import reference_preprocess_multiscale

    assert torch.equal(reference_preprocess_multiscale(pixel, **SMALL)[0], multi.pixel_values)
    tiles = preprocess_tiles(pixel)
    assert tiles.pixel_values.shape == (1, 3, 448, 448) and tiles.grid == (1, 1)


@pytest.mark.parametrize("size", [(1, 200), (200, 1), (3, 600), (600, 3)])
def test_extreme_but_allowed_aspect_ratios(size):
    width, height = size
    image = make_test_pattern(height, width)
    multi = preprocess_multiscale(image, **SMALL)
    assert multi.scales[-1].original_hw == (height, width)
    from navil_utils.reference.preprocessing import reference_preprocess_multiscale

    pixel_values, grids, _ = reference_preprocess_multiscale(image, **SMALL)
    assert torch.equal(pixel_values, multi.pixel_values) and grids.tolist() == multi.image_grid_thw.tolist()
    tiles = preprocess_tiles(image)
    assert tiles.num_tiles == 7  # 1×6 or 6×1 grid + thumbnail


def test_tiling_has_no_aspect_ratio_limit():
    tiles = preprocess_tiles(make_test_pattern(1, 1000))  # 1000:1 is fine for NVLM-D
    assert tiles.grid == (6, 1)


ALL_MODES = ["RGB", "RGBA", "LA", "L", "1", "P", "CMYK", "I;16"]


def _in_mode(mode: str) -> Image.Image:
    base = make_test_pattern(30, 50)
    if mode == "I;16":
        return Image.fromarray((np.asarray(base.convert("L")).astype(np.uint16) * 257))
    if mode in ("RGBA", "LA"):
        converted = base.convert(mode)
        converted.putalpha(128)
        return converted
    return base.convert(mode)


@pytest.mark.parametrize("mode", ALL_MODES)
def test_both_preprocessors_accept_every_mode(mode):
    image = _in_mode(mode)
    assert image.mode == mode
    rgb = load_image(image)
    assert rgb.mode == "RGB" and rgb.size == image.size
    assert torch.equal(preprocess_multiscale(image, **SMALL).pixel_values,
                       preprocess_multiscale(rgb, **SMALL).pixel_values)
    assert torch.equal(preprocess_tiles(image, max_num=2).pixel_values, preprocess_tiles(rgb, max_num=2).pixel_values)


def test_sixteen_bit_mode_equals_eight_bit_source():
    eight = np.asarray(make_test_pattern(30, 50).convert("L"))
    assert np.array_equal(np.asarray(to_rgb(Image.fromarray(eight.astype(np.uint16) * 257)))[..., 0], eight)


# --------------------------------------------------------------------------------------- typed errors


def test_truncated_file_names_file_and_problem(tmp_path):
    path = tmp_path / "cut.png"
    make_test_pattern(64, 64).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    for call in (load_image, preprocess_multiscale, preprocess_tiles):
        with pytest.raises(ImageLoadError, match="truncated or corrupt") as info:
            call(path)
        assert str(path) in str(info.value)


def test_truncated_jpeg(tmp_path):
    path = tmp_path / "cut.jpg"
    make_test_pattern(64, 64).save(path, quality=90)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ImageLoadError, match=f"{path.name}.*truncated or corrupt"):
        load_image(path)


def test_non_image_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("this is not an image\n")
    for call in (load_image, preprocess_multiscale, preprocess_tiles):
        with pytest.raises(ImageLoadError, match="notes.txt: not an image file"):
            call(path)
    with pytest.raises(ImageLoadError, match="not an image file"):
        load_image(b"GIF89a-but-not-really")


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageNotFoundError, match="no such image file") as info:
        load_image(tmp_path / "nope.png")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ImageLoadError)
    with pytest.raises(ImageLoadError, match="is a directory"):
        load_image(tmp_path)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares ``width × height`` (1-bit greyscale) followed by a tiny IDAT/IEND."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [10_000, 20_000])  # 100 MPixel (Pillow warns) and 400 MPixel (Pillow raises)
def test_decompression_bomb(tmp_path, side):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(side, side))
    for call in (load_image, preprocess_multiscale, preprocess_tiles):
        with pytest.raises(ImageLoadError, match="decompression bomb") as info:
            call(path)
        assert "bomb.png" in str(info.value)
    assert side * side > DEFAULT_MAX_IMAGE_PIXELS


def test_pixel_limit_is_configurable():
    with pytest.raises(ImageLoadError, match="exceeds the limit of 100 pixels"):
        load_image(make_test_pattern(20, 20), max_image_pixels=100)
    assert load_image(make_test_pattern(10, 10), max_image_pixels=100).size == (10, 10)


def test_unreachable_url_fails_fast_with_clear_error():
    start = time.perf_counter()
    with pytest.raises(ImageLoadError, match=r"could not download image http://127\.0\.0\.1:9/x\.png"):
        load_image("http://127.0.0.1:9/x.png", timeout=2.0)
    assert time.perf_counter() - start < 5.0
    with pytest.raises(ImageLoadError, match="could not download"):
        preprocess_multiscale("http://127.0.0.1:9/x.png")


def test_bad_arrays_and_objects():
    with pytest.raises(ImageLoadError, match="unsupported array dtype float64"):
        load_image(np.zeros((4, 4, 3)))
    with pytest.raises(ImageLoadError, match=r"expected an \(H, W\)"):
        load_image(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ImageLoadError, match="cannot load an image from <int>"):
        load_image(42)
    assert np.asarray(load_image(np.full((2, 3), 7, np.uint8))).shape == (2, 3, 3)


def test_encoded_bytes_and_buffers_round_trip():
    image = make_test_pattern(10, 12)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    assert np.array_equal(np.asarray(load_image(buffer.getvalue())), np.asarray(image))


# --------------------------------------------------------------------------- deadlines and special files

_PNG = io.BytesIO()
make_test_pattern(16, 24).save(_PNG, format="PNG")
PNG_BYTES = _PNG.getvalue()


class _ImageServer(http.server.BaseHTTPRequestHandler):
    """/ok.png: the whole image; /trickle.png: the image one byte every 0.1 s (Content-Length set);
    /trickle-headers: the status line one byte every 0.1 s; /silent: headers, then nothing;
    /stream: 2 MB in chunks without Content-Length."""

    protocol_version = "HTTP/1.0"

    def log_message(self, *args):  # keep the test output clean
        pass

    def _trickle(self, data: bytes, limit: int = 200) -> None:
        for byte in data[:limit]:
            try:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
            except OSError:  # the client gave up (shut its socket down)
                return
            time.sleep(0.1)

    def do_GET(self):
        if self.path == "/trickle-headers":
            self._trickle(b"HTTP/1.0 200 OK\r\nContent-Type: image/png\r\n\r\n")
            return
        if self.path == "/stream":
            self.send_response(200)
            self.end_headers()
            for _ in range(32):
                try:
                    self.wfile.write(b"\0" * 65536)
                except OSError:
                    return
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(PNG_BYTES)))
        self.end_headers()
        if self.path == "/ok.png":
            self.wfile.write(PNG_BYTES)
        elif self.path == "/trickle.png":
            self._trickle(PNG_BYTES)
        elif self.path == "/silent":
            self.wfile.flush()
            time.sleep(3)


@pytest.fixture()
def image_server(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageServer)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_url_download_through_local_server(image_server):
    loaded = load_image(f"{image_server}/ok.png", deadline=5.0)
    assert np.array_equal(np.asarray(loaded), np.asarray(make_test_pattern(16, 24)))


@pytest.mark.parametrize("path", ["/trickle.png", "/trickle-headers"])
def test_trickling_url_hits_the_overall_deadline(image_server, path):
    url = f"{image_server}{path}"
    start = time.perf_counter()
    with pytest.raises(ImageTimeoutError) as info:
        load_image(url, timeout=5.0, deadline=1.0)  # each read is fast: only the deadline can stop it
    elapsed = time.perf_counter() - start
    assert 0.9 <= elapsed < 3.0, elapsed
    assert url in str(info.value) and "deadline of 1 s" in str(info.value)
    assert isinstance(info.value, ImageLoadError) and isinstance(info.value, TimeoutError)


def test_silent_url_hits_the_read_timeout(image_server):
    start = time.perf_counter()
    with pytest.raises(ImageTimeoutError, match=r"/silent: no data for 0\.5 s"):
        load_image(f"{image_server}/silent", timeout=0.5, deadline=10.0)
    assert time.perf_counter() - start < 2.5


def test_url_download_size_limit(image_server):
    with pytest.raises(ImageLoadError, match=r"ok\.png is larger than 100 bytes") as info:
        load_image(f"{image_server}/ok.png", max_bytes=100)  # refused from Content-Length
    assert not isinstance(info.value, ImageTimeoutError)
    with pytest.raises(ImageLoadError, match=r"/stream is larger than 100000 bytes"):
        load_image(f"{image_server}/stream", max_bytes=100_000)  # no Content-Length: counted while reading


def test_deadline_must_be_positive():
    with pytest.raises(ValueError, match="deadline must be a finite number of seconds > 0"):
        load_image("http://127.0.0.1:9/x.png", deadline=0)


def _load_in_thread(source, seconds: float = 5.0):
    """Call load_image(source) in a daemon thread; return (finished, exception)."""
    outcome: dict = {}

    def target():
        try:
            load_image(source)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    return not thread.is_alive(), outcome.get("error")


def _unblock_fifo_reader(path) -> None:
    """If a reader is (wrongly) blocked opening the FIFO, let it through to end of file."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError as exc:
        assert exc.errno == errno.ENXIO  # no reader: nothing was blocked


def test_fifo_path_is_refused_immediately(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    link = tmp_path / "link.png"
    link.symlink_to(fifo)
    try:
        for source in (fifo, str(link)):
            start = time.perf_counter()
            finished, error = _load_in_thread(source)
            assert finished, f"load_image({source}) blocked on a FIFO"
            assert time.perf_counter() - start < 1.0
            assert isinstance(error, ImageLoadError) and not isinstance(error, ImageNotFoundError)
            assert str(source) in str(error) and "named pipe (FIFO), not a regular file" in str(error)
        with pytest.raises(ImageLoadError, match="not a regular file"):
            preprocess_multiscale(fifo, **SMALL)
    finally:
        _unblock_fifo_reader(fifo)


def test_device_file_is_refused():
    with pytest.raises(ImageLoadError, match=f"{os.devnull}: is a character device, not a regular file"):
        load_image(os.devnull)
