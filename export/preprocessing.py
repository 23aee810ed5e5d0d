"""Turn a Hugging Face image processor into mmedge's ``preprocess`` config (host side).

The config describes the PIL path of the processor (``CLIPImageProcessorPil`` /
``PilBackend``), which ``mmedge.preprocess.ImagePreprocessor`` reproduces on the device. The
torchvision backend of the same processor resizes with torch and differs from it by a few levels.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from mmedge.errors import ManifestError, ModelLoadError
from mmedge.preprocess import RESAMPLE, ImagePreprocessor

_FIX = "use a processor with a CLIP-style pipeline (resize, optional center crop, rescale, normalize)"


def preprocess_config_from_hf(image_processor: Any) -> dict[str, Any]:
    """The JSON-serializable ``preprocess`` dict equivalent to ``image_processor``.

    Reads ``do_resize``, ``size``, ``resample``, ``do_center_crop``, ``crop_size``, ``do_rescale``,
    ``rescale_factor``, ``do_normalize``, ``image_mean``, ``image_std`` and ``do_pad``. ``do_rescale=False``
    becomes ``rescale_factor: 1.0`` and ``do_normalize=False`` mean 0 / std 1 (bit-identical results).
    ``do_convert_rgb`` is not read: mmedge always converts to RGB, and with it off HF only accepts
    images that are RGB already, for which the two agree. Raises ``ModelLoadError`` for settings the
    dict cannot represent (no resize, a ``longest_edge`` / ``max_height`` size, padding, a crop
    without height and width, an unknown resample filter).
    """
    name = type(image_processor).__name__
    if not _attribute(image_processor, "do_resize"):
        raise ModelLoadError(f"image processor {name} has do_resize=False", "do_resize=True", _FIX)
    if getattr(image_processor, "do_pad", None):
        raise ModelLoadError(f"image processor {name} has do_pad=True", "do_pad False or None (no padding step)", _FIX)
    rescale = _attribute(image_processor, "do_rescale")
    normalize = _attribute(image_processor, "do_normalize")
    config = {
        "resize": _resize(image_processor, name),
        "resample": _resample_name(_attribute(image_processor, "resample"), name),
        "center_crop": _center_crop(image_processor, name),
        "rescale_factor": _plain(_attribute(image_processor, "rescale_factor")) if rescale else 1.0,
        "mean": _per_channel(image_processor, "image_mean", name) if normalize else [0.0, 0.0, 0.0],
        "std": _per_channel(image_processor, "image_std", name) if normalize else [1.0, 1.0, 1.0],
    }
    try:
        ImagePreprocessor(config)
    except ManifestError as exc:
        what = f"image processor {name} gives an unusable preprocess config: {exc.what}"
        raise ModelLoadError(what, exc.expected, _FIX) from exc
    return config


def _attribute(image_processor: Any, key: str) -> Any:
    """``image_processor.<key>``, or ``ModelLoadError`` when the processor has no such attribute."""
    if not hasattr(image_processor, key):
        raise ModelLoadError(
            f"image processor {type(image_processor).__name__} has no attribute '{key}'",
            "a Hugging Face image processor with CLIPImageProcessor's attributes",
            _FIX,
        )
    return getattr(image_processor, key)


def _size_dict(value: Any) -> dict[str, Any] | None:
    """A HF ``SizeDict`` or dict as a plain dict without ``None`` entries; ``None`` for anything else."""
    if isinstance(value, dict):
        items = value.items()
    elif hasattr(value, "__dataclass_fields__"):
        items = value  # SizeDict iterates over its (key, value) pairs
    else:
        return None
    return {key: _plain(size) for key, size in items if size is not None}


def _resize(image_processor: Any, name: str) -> dict[str, int]:
    """``{"shortest_edge": n}`` or ``{"height": h, "width": w}`` from ``size``."""
    size = _attribute(image_processor, "size")
    resize = _size_dict(size)
    if resize is None or set(resize) not in ({"shortest_edge"}, {"height", "width"}):
        raise ModelLoadError(
            f"image processor {name} has size={size!r}",
            "{'shortest_edge': N} or {'height': H, 'width': W}",
            _FIX,
        )
    return resize


def _center_crop(image_processor: Any, name: str) -> list[int] | None:
    """``[height, width]`` from ``crop_size`` when ``do_center_crop``, else ``None``."""
    if not _attribute(image_processor, "do_center_crop"):
        return None
    crop_size = _attribute(image_processor, "crop_size")
    crop = _size_dict(crop_size)
    if crop is None or set(crop) != {"height", "width"}:
        raise ModelLoadError(f"image processor {name} has crop_size={crop_size!r}", "{'height': H, 'width': W}", _FIX)
    return [crop["height"], crop["width"]]


def _resample_name(resample: Any, name: str) -> str:
    """mmedge's filter name for a PIL ``Resampling`` / int / torchvision ``InterpolationMode`` / name."""
    if resample is None:
        return "bilinear"  # PilBackend.resize's default
    if isinstance(getattr(resample, "value", None), str):  # torchvision InterpolationMode
        resample = resample.value
    if isinstance(resample, str):
        key = resample.lower()
    else:
        try:
            key = Image.Resampling(int(resample)).name.lower()
        except (TypeError, ValueError):
            key = repr(resample)
    if key not in RESAMPLE:
        raise ModelLoadError(f"image processor {name} has resample={resample!r}", f"one of {sorted(RESAMPLE)}", _FIX)
    return key


def _per_channel(image_processor: Any, key: str, name: str) -> list[float]:
    """Three floats from the attribute ``key``, a scalar or a 3-sequence."""
    value = _attribute(image_processor, key)
    try:
        values = [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]
    except (TypeError, ValueError):
        values = []
    if len(values) != 3:
        raise ModelLoadError(f"image processor {name} has {key}={value!r}", "one number or three (RGB)", _FIX)
    return values


def _plain(value: Any) -> Any:
    """Numpy scalars as Python numbers, so the config stays JSON-serializable."""
    return value.item() if hasattr(value, "item") else value
