"""Images for INT8 calibration and for measuring quantized fidelity.

The default calibration set is ``data/images/calibration-*`` (public-domain photos); the
``holdout-*`` photos are never calibrated on and measure fidelity after quantization, unless the export names
its own images (``--fidelity-images DIR``, or the ``--calibration`` folder of a static INT8 export): a model of
another domain is measured on its own kind of images. Fidelity images a static export also calibrates on are left out
(``fidelity_paths``), or, where all of them are, recorded as not held out.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps

from mmedge.errors import CalibrationError, ImageError, InputError, warn
from mmedge.images import load_image

DATA_DIR = Path(__file__).parent / "data" / "images"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
MAX_CALIBRATION_IMAGES = 256
FEW_CALIBRATION_IMAGES = 16  # below this a static calibration's activation ranges are warned about


def bundled(split: str) -> list[Path]:
    return sorted(DATA_DIR.glob(f"{split}-*.jpg"))


def calibration_paths(folder: str | Path | None) -> tuple[list[Path], str]:
    """Image files to calibrate on and a note for the manifest saying where they came from."""
    if folder is None:
        paths = bundled("calibration")
        return paths, f"bundled ({len(paths)} public-domain photos)"
    return _folder_images(folder, "calibration", "--calibration", CalibrationError)


def fidelity_paths(options) -> tuple[list[Path], str]:
    """Photos to measure a quantized export's fidelity on, and a note for the manifest: ``--fidelity-images``, else
    the ``--calibration`` folder of a static INT8 export, else the bundled held-out photos.

    ``--fidelity-images`` that a static INT8 export also calibrates on (the same file, or one with the same bytes)
    are left out, so what is measured is held out; where all of them are calibration images they are measured
    anyway and the note (and ``fidelity_on_calibration``) says they are not held out."""
    if options.fidelity is not None:
        found = _listed_images(options.fidelity, "fidelity", "--fidelity-images", InputError)
        calibrated = _calibrated_on(found, options)
        kept = [p for p in found if p not in calibrated] or found
        paths, note = _first_images(kept, options.fidelity)
        if len(kept) < len(found):
            return paths, note[:-1] + f"; {len(calibrated)} calibrated on, left out)"
    elif _calibrates_on_folder(options):
        paths, note = _folder_images(options.calibration, "calibration", "--calibration", CalibrationError)
    else:
        paths = bundled("holdout")
        return paths, f"bundled held-out photos ({len(paths)})"
    return paths, note + (f": the {_calibration_name(options)} images, not held out"
                          if fidelity_on_calibration(options) else "")


def fidelity_on_calibration(options) -> bool:
    """Whether the fidelity photos are images the export calibrates on, so not held out: the ``--calibration``
    folder of a static INT8 export with no ``--fidelity-images``, or ``--fidelity-images`` that are all calibration
    images (the same folder, or copies of its files)."""
    if options.fidelity is None:
        return _calibrates_on_folder(options)
    try:
        found = _listed_images(options.fidelity, "fidelity", "--fidelity-images", InputError)
    except InputError:
        return False  # no fidelity images at all: fidelity_paths says why
    return len(_calibrated_on(found, options)) == len(found)


def _calibration_name(options) -> str:
    return "--calibration" if options.calibration is not None else "bundled calibration"


def _calibrated_on(paths: list[Path], options) -> set[Path]:
    """Those of ``paths`` a static INT8 export calibrates on: the same file as a calibration image (after links),
    or one with the same bytes."""
    if not (options.precision == "int8" and options.quantization == "static"):
        return set()
    calibration = calibration_paths(options.calibration)[0]
    resolved = {p.resolve() for p in calibration}
    by_size: dict[int, list[Path]] = {}
    for path in calibration:
        by_size.setdefault(_size(path), []).append(path)
    same = set()
    for path in paths:
        twins = by_size.get(_size(path), ())
        if path.resolve() in resolved or (twins and _digest(path) in {_digest(c) for c in twins}):
            same.add(path)
    return same


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1  # unreadable: its own error comes when it is decoded


def _digest(path: Path) -> str:
    """The file's sha256, read once per file version however often an export asks (camera frames of one size all
    share a byte size: comparing each with each hashed every calibration image once per fidelity image)."""
    try:
        status = path.stat()
    except OSError:
        return f"unreadable:{path.resolve()}"
    return _digest_of(str(path.resolve()), status.st_size, status.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _digest_of(path: str, size: int, mtime_ns: int) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return f"unreadable:{path}"


def check_image_folders(options) -> None:
    """Every image the export would read from ``--calibration`` and ``--fidelity-images`` decodes: checked before
    anything is loaded, as a bad one would otherwise stop the export after loading and tracing."""
    folders = []
    if options.calibration is not None:
        folders.append(("--calibration", CalibrationError, calibration_paths(options.calibration)[0]))
    if options.fidelity is not None and not fidelity_on_calibration(options):
        folders.append(("--fidelity-images", InputError, fidelity_paths(options)[0]))
    for flag, error, paths in folders:
        for path in paths:
            _load_from_folder(path, flag, error)
    if _calibrates_on_folder(options):
        count = len(calibration_paths(options.calibration)[0])
        if count < FEW_CALIBRATION_IMAGES:
            images = f"{count} image{'' if count == 1 else 's'}"
            warn(f"--calibration folder '{options.calibration}' holds {images}: activation ranges measured "
                          f"on fewer than {FEW_CALIBRATION_IMAGES} images clip what other images hold; the export "
                          "still measures and gates fidelity, but 32-256 representative images are advised")


def _calibrates_on_folder(options) -> bool:
    return options.calibration is not None and options.quantization == "static" and options.precision == "int8"


def _folder_images(folder: str | Path, purpose: str, flag: str, error) -> tuple[list[Path], str]:
    return _first_images(_listed_images(folder, purpose, flag, error), folder)


def _listed_images(folder: str | Path, purpose: str, flag: str, error) -> list[Path]:
    """Every image file in ``folder``, by name; ``error`` when it is not a folder or holds none."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise error(f"{purpose} folder '{folder}' {what}", "a folder of images",
                    f"pass {flag} DIR with JPEG/PNG images, or leave it out for the bundled set")
    try:
        found = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    except OSError as exc:
        raise error(f"cannot list {purpose} folder '{folder}' ({exc.strerror or exc})", "a readable folder of images",
                    "check the folder's permissions") from None
    if not found:
        raise error(f"{purpose} folder '{folder}' holds no images",
                    f"files ending in {', '.join(IMAGE_SUFFIXES)}", "add 32-256 representative images")
    return found


def _first_images(found: list[Path], folder: str | Path) -> tuple[list[Path], str]:
    """The first ``MAX_CALIBRATION_IMAGES`` of ``found`` (images of ``folder``) and the manifest's note on them."""
    name = Path(folder).name
    paths = found[:MAX_CALIBRATION_IMAGES]
    if len(found) > len(paths):
        return paths, f"{name}/ (the first {len(paths)} of {len(found)} images by name)"
    return paths, f"{name}/ ({len(paths)} image{'' if len(paths) == 1 else 's'})"


def load_calibration_image(path: Path) -> Image.Image:
    return _load_from_folder(path, "--calibration", CalibrationError)


def _load_from_folder(path: Path, flag: str, error) -> Image.Image:
    """The image at ``path``, one of the ``flag`` folder's; ``error`` when it does not decode."""
    try:
        return load_image(path)
    except ImageError as exc:
        raise error(f"{flag} image '{path.name}' is unusable: {exc.what}", "readable images only",
                    f"remove or replace '{path}' in the {flag} folder") from None


def holdout_images(paths: list[Path] | None = None) -> list[Image.Image]:
    """The fidelity photos (default: the bundled held-out ones), each also flipped and cropped twice: 4 views each."""
    views = []
    for path in bundled("holdout") if paths is None else paths:
        image = load_image(path)
        w, h = image.size
        views += [
            image,
            ImageOps.mirror(image),
            image.crop((w // 6, h // 6, w - w // 6, h - h // 6)),
            image.crop((0, 0, int(w * 0.6), int(h * 0.6))),
        ]
    return views


def pixel_feeds(preprocessor, paths: list[Path], input_name: str = "pixel_values") -> Iterator[dict[str, np.ndarray]]:
    """One calibration feed per image: {input_name: [1, 3, height, width]}."""
    for path in paths:
        yield {input_name: preprocessor([load_calibration_image(path)])}
