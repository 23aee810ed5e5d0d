"""What a loaded checkpoint must hold before it is exported: every weight the architecture needs, a tokenizer with
the model's vocabulary, and an image processor that makes images of the size the vision tower was built for.

Each would otherwise pass unnoticed: transformers fills missing weights with random ones (and the export's parity
checks compare the graphs with that same wrongly loaded model), an empty tokenizer saves and loads, and a processor
of another size fails only once the first image reaches the vision tower.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmedge.errors import ModelLoadError, warn

SHOWN_KEYS = 5  # weight names listed in a message
PLAIN_TEXT = "a photo of a cat"  # a tokenizer with its vocabulary encodes this to ordinary tokens
MIN_VOCABULARY_SHARE = 0.5  # real tokenizers hold about the config's vocab_size (which is padded a little)
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")  # where save_pretrained puts the processor


def check_loaded_weights(model: str, loaded, info: dict) -> None:
    """Refuse a checkpoint that lacks weights the architecture needs (``from_pretrained(output_loading_info=True)``'s
    ``missing_keys``; transformers already leaves out what the class expects to be absent and weights tied to one that
    was loaded); warn about weights the architecture does not use (``unexpected_keys``)."""
    mismatched = sorted(info.get("mismatched_keys") or ())  # (name, checkpoint's shape, the config's shape)
    if mismatched:
        shapes = [f"{name} is {_shape(stored)} in the checkpoint, {_shape(built)} by config.json"
                  for name, stored, built in mismatched]
        raise ModelLoadError(
            f"the weights of '{model}' do not fit its config.json: {len(mismatched)} tensor"
            f"{' has' if len(mismatched) == 1 else 's have'} another shape ({_some(shapes)})",
            "a checkpoint whose weights match its config.json (as save_pretrained writes them together)",
            "check that config.json is the checkpoint's own (sizes such as hidden_size, vocab_size, image_size), "
            "or re-download the complete checkpoint",
        )
    missing = sorted(_untied(loaded, info.get("missing_keys") or ()))
    if missing:
        raise ModelLoadError(
            f"the weights of '{model}' lack {len(missing)} tensor{'' if len(missing) == 1 else 's'} the architecture "
            f"needs ({_some(missing)}): transformers would fill them with random values",
            "a checkpoint whose weights match its config.json (every tensor save_pretrained writes)",
            "re-download or re-save the complete checkpoint; to export the architecture alone, pass --random-weights",
        )
    unexpected = sorted(info.get("unexpected_keys") or ())
    if unexpected:  # heads of a bigger class are harmless; a config edited to fewer layers is not: say it, go on
        warn(f"the weights of '{model}' hold {len(unexpected)} tensor{'' if len(unexpected) == 1 else 's'} "
                      f"this {type(loaded).__name__} does not use ({_some(unexpected)}); they are left out of the "
                      "export: check that config.json describes the checkpoint (e.g. its number of layers)")


def _untied(loaded, keys) -> set[str]:
    """``keys`` less any parameter that shares its storage with a loaded one (a tied weight transformers tied)."""
    parameters = dict(loaded.named_parameters(remove_duplicate=False))
    loaded_storage = {p.data_ptr() for name, p in parameters.items() if name not in keys}
    return {key for key in keys if key not in parameters or parameters[key].data_ptr() not in loaded_storage}


def _shape(size) -> str:
    return "[" + ", ".join(str(n) for n in size) + "]"


def _some(keys: list[str]) -> str:
    more = len(keys) - SHOWN_KEYS
    return ", ".join(keys[:SHOWN_KEYS]) + (f", and {more} more" if more > 0 else "")


def check_tokenizer(model: str | Path, tokenizer, expected: int | None) -> None:
    """Refuse a tokenizer loaded without its vocabulary (a tokenizer_config.json without tokenizer.json or the files
    it names), from folder or hub id ``model``: it holds only the special tokens, far fewer than the ``expected``
    vocabulary size (the model config's ``vocab_size``), and encodes text to nothing but those."""
    size = len(tokenizer)
    special = set(tokenizer.all_special_ids)
    ordinary = [i for i in tokenizer(PLAIN_TEXT, add_special_tokens=False)["input_ids"] if i not in special]
    if ordinary and not (expected and size < MIN_VOCABULARY_SHARE * expected):
        return
    files = _vocabulary_files(tokenizer)
    absent = [name for name in files if not (Path(model) / name).is_file()] if Path(model).is_dir() else []
    found = f"{size} tokens" + (f" for a model of {expected}" if expected else "")
    encoded = "no ordinary token" if not ordinary else f"{len(ordinary)} ordinary tokens"
    raise ModelLoadError(
        f"the tokenizer of '{model}' ({type(tokenizer).__name__}) loaded without its vocabulary ({found}; "
        f"'{PLAIN_TEXT}' encodes to {encoded})" + (f": missing {', '.join(absent)}" if absent else ""),
        f"{files[0]} (or {' and '.join(files[1:])}) beside tokenizer_config.json" if len(files) > 1
        else f"{files[0]} beside tokenizer_config.json",
        "copy the checkpoint's tokenizer files into the folder, or save them with tokenizer.save_pretrained",
    )


def _vocabulary_files(tokenizer) -> list[str]:
    """The files that hold this tokenizer class's vocabulary: tokenizer.json, then its class's own (vocab.json and
    merges.txt for a BPE tokenizer, ...)."""
    names = (getattr(tokenizer, "vocab_files_names", None) or {}).values()
    return ["tokenizer.json", *sorted(set(names) - {"tokenizer.json"}, reverse=True)]


def check_image_size(model: str, preprocess: dict[str, Any], config) -> None:
    """Refuse an image processor whose images are not the size the vision tower was built for (``preprocess``: the
    manifest's preprocessing, from ``preprocess_config_from_hf``), naming both sizes and the processor's file."""
    vision = getattr(config, "vision_config", None)
    size = getattr(vision, "image_size", None)
    if size is None:
        return
    expected = [int(size), int(size)] if isinstance(size, int) else [int(s) for s in size]
    resize = preprocess.get("resize") or {}
    made = preprocess.get("center_crop") or ([resize["height"], resize["width"]] if "height" in resize else None)
    if made is None or list(made) == expected:
        return
    folder = Path(model)
    where = next((folder / name for name in PROCESSOR_FILES if (folder / name).is_file()), None) \
        if folder.is_dir() else None
    source = f"'{where}'" if where else f"the image processor of '{model}'"
    step = "crop_size" if preprocess.get("center_crop") else "size"
    raise ModelLoadError(
        f"{source} makes {made[0]}x{made[1]} images ({step}) but the model's vision tower takes "
        f"{expected[0]}x{expected[1]} (vision_config.image_size in config.json)",
        "an image processor whose output size is the vision_config.image_size",
        f"set {step} to {expected[0]}x{expected[1]} in {where.name if where else 'the processor config'}, or use the "
        "processor published with this checkpoint",
    )
