"""Robust image loading shared by NaViL's multi-scale packing and NVLM-D's tiling.

:func:`load_image` turns a path, URL, raw bytes, ``PIL.Image`` or ``uint8`` array into a fully
decoded RGB ``PIL.Image`` — or raises :class:`~navil_utils.errors.ImageLoadError` naming the source
and the problem.  Conversions, all documented in :func:`to_rgb`:

* transparency (RGBA, LA, PA, P/L/RGB with a ``transparency`` entry) is composited on **white**,
  like transformers' ``convert_to_rgb``.  NaViL's own ``demo.py`` calls ``.convert("RGB")``, which
  instead drops alpha and keeps whatever colour the transparent pixels store (often black);
* 16-bit and 32-bit greyscale (``I;16*``, ``I``) are scaled to 8 bit (``round(v / 257)``), not
  clipped as ``PIL.Image.convert`` would do (which turns most 16-bit images white);
* the EXIF orientation of photos is applied (the reference demo does not apply it);
* every other mode (L, 1, P, CMYK, YCbCr, LAB, HSV, F) goes through PIL's own conversion.
"""
from __future__ import annotations

import http.client
import io
import math
import os
import socket
import stat
import threading
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from navil_utils.errors import (
    ConfigError,
    ImageLoadError,
    ImageNotFoundError,
    ImageTimeoutError,
)

#: Anything :func:`load_image` accepts.
ImageSource = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]

#: Pillow's decompression-bomb threshold (≈ 89.5 MPixel); larger images are refused by default.
DEFAULT_MAX_IMAGE_PIXELS: int = int(Image.MAX_IMAGE_PIXELS or 89_478_485)
#: Seconds a URL may stay silent (connecting, or between two reads) before giving up (there is often no
#: network in CI).
DEFAULT_URL_TIMEOUT: float = 5.0
#: Seconds the whole download of a URL may take (connection, headers and body together); a server that
#: trickles bytes slowly never trips the per-read :data:`DEFAULT_URL_TIMEOUT`, but trips this.
DEFAULT_URL_DEADLINE: float = 30.0
#: Largest download accepted from a URL.
MAX_DOWNLOAD_BYTES: int = 64 * 1024 * 1024
_CHUNK_BYTES = 64 * 1024

_EXIF_ORIENTATION_TAG = 0x0112
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def describe_source(source: object) -> str:
    """A short human-readable name of an image source, used in error messages."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, Image.Image):
        filename = getattr(source, "filename", "") or ""
        return filename or f"<PIL.Image mode={source.mode} size={source.width}x{source.height}>"
    if isinstance(source, np.ndarray):
        return f"<array shape={tuple(source.shape)} dtype={source.dtype}>"
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    return f"<{type(source).__name__}>"


def _is_url(text: str) -> bool:
    return text.startswith(("http://", "https://", "ftp://"))


class _Deadline:
    """Shuts down every socket of one download when its deadline passes.

    The shutdown wakes a ``recv`` blocked anywhere (connecting, reading headers, TLS handshake, body),
    which a per-read socket timeout cannot do against a server that trickles one byte at a time.
    Duplicates of the sockets are kept (and closed by :meth:`stop`): a TLS wrapper detaches the
    original socket object, but ``shutdown`` acts on the connection, whichever descriptor names it.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def passed(self) -> bool:
        return self.expired or self.remaining() <= 0

    def register(self, sock: socket.socket) -> None:
        duplicate = sock.dup()
        with self._lock:
            self._sockets.append(duplicate)
            expired = self.expired
        if expired:
            self._shutdown(duplicate)

    @staticmethod
    def _shutdown(sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            self._shutdown(sock)

    def stop(self) -> None:
        self._timer.cancel()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            sock.close()

    def connection_class(self, base: type[http.client.HTTPConnection]) -> type[http.client.HTTPConnection]:
        """``base`` whose sockets are registered with this deadline as soon as they are connected."""
        deadline = self

        class _WatchedConnection(base):  # type: ignore[valid-type, misc]
            def __init__(self, *args, **kwargs) -> None:
                super().__init__(*args, **kwargs)
                create = self._create_connection

                def _create_and_register(*c_args, **c_kwargs):
                    sock = create(*c_args, **c_kwargs)
                    deadline.register(sock)
                    return sock

                self._create_connection = _create_and_register

        return _WatchedConnection


class _WatchedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self._deadline = deadline

    def http_open(self, req):
        return self.do_open(self._deadline.connection_class(http.client.HTTPConnection), req)


class _WatchedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self._deadline = deadline

    def https_open(self, req):
        kwargs = {"context": self._context}
        if getattr(self, "_check_hostname", None) is not None:  # Python < 3.12
            kwargs["check_hostname"] = self._check_hostname
        return self.do_open(self._deadline.connection_class(http.client.HTTPSConnection), req, **kwargs)


def _is_socket_timeout(exc: BaseException) -> bool:
    return isinstance(exc, TimeoutError) or isinstance(getattr(exc, "reason", None), TimeoutError)


def _download(url: str, timeout: float, deadline: float, max_bytes: int) -> bytes:
    """The body of ``url``: at most ``max_bytes``, within ``deadline`` seconds in all, with no silence
    longer than ``timeout`` seconds."""
    for label, value in (("timeout", timeout), ("deadline", deadline)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{label} must be a finite number of seconds > 0, got {value!r}")
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
        raise ConfigError(f"max_bytes must be a positive integer, got {max_bytes!r}")

    def too_slow(received: int) -> ImageTimeoutError:
        return ImageTimeoutError(
            f"could not download image {url}: not complete within the deadline of {deadline:g} s "
            f"({received} bytes received); pass deadline=... to allow more time")

    def too_large(size: int) -> ImageLoadError:
        return ImageLoadError(f"image at {url} is larger than {max_bytes} bytes ({size} bytes); refusing to load it")

    clock = _Deadline(deadline)
    opener = urllib.request.build_opener(_WatchedHTTPHandler(clock), _WatchedHTTPSHandler(clock))
    request = urllib.request.Request(url, headers={"User-Agent": "navil-utils"})
    chunks: list[bytes] = []
    received = 0
    try:
        with opener.open(request, timeout=min(timeout, deadline)) as response:
            declared = (getattr(response, "headers", None) or {}).get("Content-Length", "")
            if declared.strip().isdigit() and int(declared) > max_bytes:
                raise too_large(int(declared))
            read = getattr(response, "read1", None) or response.read
            while True:
                if clock.passed():
                    raise too_slow(received)
                chunk = read(_CHUNK_BYTES)
                if not chunk:
                    if clock.passed():  # the deadline shut the socket: this end of data is not the file's
                        raise too_slow(received)
                    break
                received += len(chunk)
                if received > max_bytes:
                    raise too_large(received)
                chunks.append(chunk)
    except ImageLoadError:
        raise
    except urllib.error.HTTPError as exc:
        raise ImageLoadError(f"could not download image {url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        if clock.passed():
            raise too_slow(received) from exc
        if _is_socket_timeout(exc):
            raise ImageTimeoutError(
                f"could not download image {url}: no data for {min(timeout, deadline):g} s (timeout); "
                f"pass timeout=... to wait longer") from exc
        reason = getattr(exc, "reason", exc)
        raise ImageLoadError(
            f"could not download image {url}: {reason} (is the network reachable? "
            f"pass a local path or a PIL image instead)"
        ) from exc
    finally:
        clock.stop()
    return b"".join(chunks)


_FILE_KINDS = ((stat.S_ISFIFO, "named pipe (FIFO)"), (stat.S_ISCHR, "character device"),
               (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"))


def _file_kind(mode: int) -> str:
    return next((kind for test, kind in _FILE_KINDS if test(mode)), "special file")


def _open_regular_file(path: Path, name: str) -> io.BufferedReader:
    """Open ``path`` for reading if, and only if, it is a regular file (checked before opening: a FIFO
    or a device could block forever or never end)."""
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise ImageNotFoundError(f"{name}: no such image file") from exc
    except OSError as exc:
        raise ImageLoadError(f"{name}: cannot read the file ({exc})") from exc
    if stat.S_ISDIR(info.st_mode):
        raise ImageLoadError(f"{name}: is a directory, not an image file")
    if not stat.S_ISREG(info.st_mode):
        raise ImageLoadError(
            f"{name}: is a {_file_kind(info.st_mode)}, not a regular file; refusing to read it "
            f"(it could block forever) — save the image to a file, or pass its bytes")
    try:  # O_NONBLOCK: should the path have been swapped for a FIFO since os.stat, opening cannot block
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise ImageLoadError(f"{name}: cannot read the file ({exc})") from exc
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise ImageLoadError(f"{name}: is a {_file_kind(mode)}, not a regular file; refusing to read it")
    return os.fdopen(fd, "rb")


def _check_pixel_count(width: int, height: int, limit: int, name: str) -> None:
    if width * height > limit:
        raise ImageLoadError(
            f"{name}: {width}x{height} = {width * height} pixels exceeds the limit of {limit} pixels "
            f"(possible decompression bomb); pass max_image_pixels=... to allow it"
        )


def _open_encoded(fp: io.BufferedIOBase, name: str, max_image_pixels: int) -> Image.Image:
    """Open and fully decode an encoded image from a binary file object (the caller closes it)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(fp)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(f"{name}: refused as a decompression bomb ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise ImageLoadError(f"{name}: not an image file (Pillow cannot identify its format)") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageLoadError(f"{name}: truncated or corrupt image header ({exc})") from exc
    _check_pixel_count(image.width, image.height, max_image_pixels, name)
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageLoadError(f"{name}: truncated or corrupt {image.format or ''} image data ({exc})") from exc
    if getattr(image, "n_frames", 1) > 1:  # multi-frame file: keep frame 0, detach from the file
        image = image.copy()
    return image


def _array_to_image(array: np.ndarray, name: str) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ImageLoadError(f"{name}: expected an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageLoadError(f"{name}: empty image")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        array = _sixteen_to_eight_bit(array)
    elif array.dtype != np.uint8:
        raise ImageLoadError(f"{name}: unsupported array dtype {array.dtype} (use uint8, uint16 or bool)")
    return Image.fromarray(np.ascontiguousarray(array))


def _sixteen_to_eight_bit(values: np.ndarray) -> np.ndarray:
    """Map 0..65535 to 0..255 by rounding ``v / 257`` (65535 / 255 = 257 exactly)."""
    values = np.clip(values.astype(np.int64), 0, 65535)
    return ((values + 128) // 257).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB (returns ``image`` itself when it is already RGB).

    Transparency is composited on white; 16/32-bit integer greyscale is scaled to 8 bit
    (``round(v / 257)``, values outside 0..65535 are clipped); float (``F``) greyscale in [0, 1] is
    scaled by 255, otherwise clipped to 0..255; everything else uses ``Image.convert("RGB")``.
    """
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        grey = _sixteen_to_eight_bit(np.asarray(image))
        return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        finite_max = float(np.nanmax(values)) if values.size else 0.0
        scale = 255.0 if finite_max <= 1.0 else 1.0
        grey = np.clip(np.nan_to_num(values * scale), 0, 255).round().astype(np.uint8)
        return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))
    has_alpha = "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def apply_exif_orientation(image: Image.Image) -> Image.Image:
    """Rotate/flip a photo according to its EXIF orientation tag (no-op without one)."""
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - unreadable EXIF is ignored, the pixels are still fine
        return image
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        transposed = ImageOps.exif_transpose(image)
        return transposed if transposed is not None else image
    return image


def load_image(
    source: ImageSource,
    *,
    max_image_pixels: int | None = None,
    timeout: float = DEFAULT_URL_TIMEOUT,
    deadline: float = DEFAULT_URL_DEADLINE,
    max_bytes: int = MAX_DOWNLOAD_BYTES,
) -> Image.Image:
    """Load ``source`` as a decoded RGB ``PIL.Image`` (EXIF orientation applied).

    Args:
        source: a path to a regular file, an ``http(s)://`` URL (fetched with ``urllib``), encoded
            bytes, a ``PIL.Image`` (any mode) or an ``(H, W[, C])`` uint8/uint16/bool array.
        max_image_pixels: refuse images with more pixels than this (default: Pillow's
            decompression-bomb threshold, ≈ 89.5 MPixel).
        timeout: seconds a URL may stay silent (connecting, or between two reads).
        deadline: seconds the whole download of a URL may take, however the bytes trickle in.
        max_bytes: largest download accepted from a URL.

    Raises:
        ImageNotFoundError: the path does not exist.
        ImageTimeoutError: a URL did not deliver within ``deadline`` (or was silent for ``timeout``)
            seconds; the message names the URL and the limit.
        ImageLoadError: not an image, truncated/corrupt data, decompression bomb, unreachable URL,
            a path that is not a regular file (directory, FIFO, device — refused without reading it),
            unsupported array — the message names the source and the problem.
    """
    limit = DEFAULT_MAX_IMAGE_PIXELS if max_image_pixels is None else int(max_image_pixels)
    name = describe_source(source)
    if isinstance(source, Image.Image):
        _check_pixel_count(source.width, source.height, limit, name)
        if source.width == 0 or source.height == 0:
            raise ImageLoadError(f"{name}: empty image")
        try:
            source.load()  # a lazily opened image may still fail to decode
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageLoadError(f"{name}: truncated or corrupt image data ({exc})") from exc
        image = source
    elif isinstance(source, np.ndarray):
        image = _array_to_image(source, name)
        _check_pixel_count(image.width, image.height, limit, name)
    elif isinstance(source, (bytes, bytearray)):
        image = _open_encoded(io.BytesIO(bytes(source)), name, limit)
    elif isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if isinstance(text, str) and _is_url(text):
            image = _open_encoded(io.BytesIO(_download(text, timeout, deadline, max_bytes)), name, limit)
        else:
            with _open_regular_file(Path(os.fsdecode(text)).expanduser(), name) as handle:
                image = _open_encoded(handle, name, limit)
    else:
        raise ImageLoadError(
            f"cannot load an image from {name}: expected a path, URL, bytes, PIL.Image or numpy array"
        )
    try:
        return to_rgb(apply_exif_orientation(image))
    except (OSError, ValueError) as exc:
        raise ImageLoadError(f"{name}: cannot convert mode {image.mode!r} to RGB ({exc})") from exc


def make_test_pattern(height: int = 240, width: int = 560, seed: int = 0) -> Image.Image:
    """A deterministic synthetic RGB image: colour gradients, a sinusoidal texture, a checkerboard
    patch, discs and thin rings — structure at every scale, so resizing artefacts are visible."""
    if height < 1 or width < 1:
        raise ValueError(f"test pattern needs a positive size, got {height}x{width}")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    u, v = xx / max(width - 1, 1), yy / max(height - 1, 1)
    red = 255 * u
    green = 255 * (0.5 + 0.5 * np.sin(2 * math.pi * (3 * u + 2 * v)))
    blue = 255 * v
    image = np.stack([red, green, blue], axis=-1)
    # checkerboard of 8-px cells in the left third
    cells = ((xx // 8 + yy // 8) % 2 == 0) & (xx < width / 3) & (yy > height / 2)
    image[cells] = 240
    # discs with random colours
    for _ in range(5):
        cy, cx = rng.uniform(0, height), rng.uniform(width / 3, width)
        radius = rng.uniform(0.08, 0.2) * min(height, width)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
        image[disc] = rng.integers(0, 256, 3)
    # thin concentric rings around the top-right corner (fine detail that aliases when shrunk)
    radius_map = np.hypot(xx - 0.85 * width, yy - 0.15 * height)
    image[(radius_map % 12 < 1.2) & (radius_map < 0.45 * min(height, width) + 12)] = 20
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
