"""Load a checkpoint as people publish it: a hub id or a local folder, safetensors weights only.

``--random-weights`` builds the same architecture from a bundled config (``data/configs``) or from a
folder's config.json with seeded random weights, so full-size exports and benchmarks run offline.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmedge.errors import InputError, ModelLoadError, warn
from mmedge.export.checkpoint_checks import check_image_size, check_loaded_weights, check_tokenizer
from mmedge.export.hub import mistyped_path_hint

CONFIG_DIR = Path(__file__).parent / "data" / "configs"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")  # what from_pretrained loads before any pickle


@dataclass
class LoadedModel:
    """A model ready for export, with everything the manifest records about where it came from."""

    family: str
    model: Any  # the transformers model, in eval mode
    tokenizer: Any  # a tokenizers-backed transformers tokenizer
    image_processor: Any
    source: dict = field(default_factory=dict)


def known_random_configs() -> list[str]:
    return sorted(json.loads(p.read_text())["model"] for p in CONFIG_DIR.glob("*.json"))


def config_sha256(config) -> str:
    """The sha256 of the checkpoint's config, whatever path it was loaded from: transformers puts the path as typed
    in ``_name_or_path`` (of the config and its sub-configs), which is left out so that 'm/clip', './m/clip/' and
    its absolute path hash alike."""
    text = json.dumps(_without_paths(config.to_dict()), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _without_paths(node):
    if isinstance(node, dict):
        return {k: _without_paths(v) for k, v in node.items() if k != "_name_or_path"}
    if isinstance(node, list):
        return [_without_paths(v) for v in node]
    return node


def recorded_source(model: str) -> str:
    """How the manifest names the checkpoint: a local folder by its absolute, resolved path (a relative one means
    another folder from another directory), a hub id or a bundled config name as typed."""
    return str(Path(model).resolve()) if Path(model).exists() else model


def _family_of(config) -> str:
    """The family exporting a checkpoint, from its config (a dict as in config.json, or a transformers config)."""
    from mmedge.export.families import MODEL_TYPES, family_for

    config = config if isinstance(config, dict) else config.to_dict()
    name = family_for(config)
    if name is None:
        model_type = config.get("model_type")
        if model_type in MODEL_TYPES:
            llm = (config.get("text_config") or {}).get("model_type")
            raise ModelLoadError(f"this '{model_type}' checkpoint's language model ('{llm}') is not supported",
                                 "a language model one of the families exports", "export a supported checkpoint")
        raise ModelLoadError(
            f"model type '{model_type}' is not supported",
            f"one of {', '.join(MODEL_TYPES)}",
            "export a CLIP, BLIP-2 or IDEFICS checkpoint",
        )
    return name


def check_weight_files(model: str, *, random_weights: bool = False, allow_pickle: bool = False) -> None:
    """Refuse a local checkpoint folder's weights from their file names alone, before anything is loaded: pickles
    without ``allow_pickle``, no weights at all, or ``allow_pickle`` where safetensors weights are loaded anyway."""
    if not random_weights and _local_folder(model):
        _refuse_pickles(Path(model), allow_pickle)


def _refuse_pickles(folder: Path, allow_pickle: bool) -> None:
    safetensors = list(folder.glob("*.safetensors"))
    pickles = [p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    preferred = [name for name in SAFE_WEIGHTS if (folder / name).is_file()]
    if allow_pickle and preferred:  # from_pretrained loads these whatever pickles lie beside them: the flag is idle
        raise InputError(
            f"--allow-pickle would change nothing for '{folder}': it holds safetensors weights ({preferred[0]}), "
            "which are loaded in preference to any pickle",
            "--allow-pickle only for a checkpoint whose weights are pickled (pytorch_model.bin, no model.safetensors)",
            "drop --allow-pickle",
        )
    if not safetensors and pickles and not allow_pickle:
        raise ModelLoadError(
            f"'{folder}' holds only pickled weights ({', '.join(p.name for p in pickles[:3])})",
            "weights in safetensors format (model.safetensors)",
            "convert the checkpoint to safetensors, or pass --allow-pickle if you trust its author "
            "(it is then loaded with torch.load(weights_only=True))",
        )
    if not safetensors and not pickles:
        raise ModelLoadError(
            f"'{folder}' has a config.json but no weights",
            "model.safetensors (or sharded *.safetensors) beside config.json",
            "copy the whole checkpoint folder, or pass --random-weights to export the architecture alone",
        )


def checkpoint_family(model: str, *, random_weights: bool = False) -> str:
    """The family of ``model`` read from its config alone, before any weights: a bundled config's, a folder's
    config.json, or for a hub id the hub's config (refused at once when the hub cannot be reached)."""
    return family_of_config(checkpoint_config(model, random_weights=random_weights))


def family_of_config(config: dict) -> str:
    """The family exporting the checkpoint whose config (as in config.json) is ``config``."""
    return _family_of(config)


def checkpoint_config(model: str, *, random_weights: bool = False) -> dict:
    """The config of ``model`` as a dict (as in config.json), read before any weights (see ``checkpoint_family``)."""
    if random_weights:
        entry = _bundled_config(model)
        if entry is not None:
            return entry["config"]
        if not (Path(model) / "config.json").is_file():
            raise _not_bundled(model)
    elif not _local_folder(model):
        import transformers

        return _hub_config(transformers, model).to_dict()
    try:
        config = json.loads((Path(model) / "config.json").read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelLoadError(f"cannot read '{Path(model) / 'config.json'}' ({_first_line(exc)})",
                             "a JSON config written by save_pretrained", "re-copy the checkpoint folder") from None
    return config


def _local_folder(model: str) -> bool:
    """Whether ``model`` is a checkpoint folder (False: a hub id); a path that is not a usable folder is refused."""
    folder = Path(model)
    if folder.exists():
        if not folder.is_dir():
            raise ModelLoadError(
                f"'{model}' is a file, not a checkpoint folder",
                "a Hugging Face checkpoint folder (config.json + *.safetensors) or a hub id",
                "pass the folder that holds the file (the one save_pretrained wrote)",
            )
        if not (folder / "config.json").is_file():
            raise ModelLoadError(
                f"'{model}' has no config.json", "a Hugging Face checkpoint folder (config.json + *.safetensors)",
                "point at the folder save_pretrained wrote",
            )
        return True
    if _looks_like_a_path(model):  # not a hub id: fail now rather than ask the hub
        raise ModelLoadError(
            f"checkpoint folder '{model}' does not exist",
            "a local checkpoint folder (config.json + *.safetensors) or a hub id such as "
            "'openai/clip-vit-base-patch32'",
            "check the path",
        )
    if not _valid_hub_id(model):  # a space, a non-ASCII letter...: no hub has it, so it is a mistyped folder
        stray = model.strip() != model and Path(model.strip()).exists()  # a copied path's trailing space, say
        raise ModelLoadError(
            f"checkpoint folder '{model}' does not exist, and '{model}' is not a valid hub id either"
            + (f" ('{model.strip()}' exists: a stray space?)" if stray else mistyped_path_hint(model)),
            "a local checkpoint folder (config.json + *.safetensors) or a hub id such as "
            "'openai/clip-vit-base-patch32' (ASCII letters, digits, '-', '_' and '.', no spaces)",
            "check the path (a stray space, quote or accent?)",
        )
    return False


def _valid_hub_id(model: str) -> bool:
    """Whether ``model`` passes the hub client's own rule for an id (it raises HFValidationError otherwise)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(model)
    except HFValidationError:
        return False
    return True


def load_checkpoint(model: str, *, random_weights: bool = False, allow_pickle: bool = False,
                    seed: int = 0) -> LoadedModel:
    """Load ``model`` (hub id, local folder, or a bundled config name with ``random_weights``)."""
    if random_weights:
        return _load_random(model, seed)
    check_weight_files(model, allow_pickle=allow_pickle)
    return _load_pretrained(model, allow_pickle)


def _looks_like_a_path(model: str) -> bool:
    """Hub ids are 'name' or 'owner/name'; anything else that does not exist is a mistyped folder."""
    return model.startswith((".", "/", "~")) or "\\" in model or model.count("/") > 1 or Path(model).is_absolute()


def _hub(model: str) -> dict:
    """from_pretrained keywords: none for a folder; for a hub id, what ``mmedge.export.hub`` allows."""
    if Path(model).exists():
        return {}
    from mmedge.export.hub import hub_options

    return hub_options(model)


def _hub_config(transformers, model: str):
    try:
        return transformers.AutoConfig.from_pretrained(model, **_hub(model))
    except (OSError, ValueError) as exc:  # ValueError: the hub client's HFValidationError among others
        raise ModelLoadError(
            f"cannot load a config for '{model}' ({str(exc).splitlines()[0][:200]}){mistyped_path_hint(model)}",
            "a local checkpoint folder or a reachable Hugging Face hub id",
            "check the path or id; offline, use a local folder or --random-weights",
        ) from None


def _load_pretrained(model: str, allow_pickle: bool) -> LoadedModel:
    import transformers

    config = _hub_config(transformers, model)
    digest = config_sha256(config)  # as config.json has it (loading sets its dtype to the one loaded)
    family = _family_of(config)
    from mmedge.export.families import FAMILIES

    model_class = FAMILIES[family].model_class()
    tokenizer, processor = _load_preprocessors(model, config)  # small files first: their refusals cost no weights
    from safetensors import SafetensorError

    try:
        # use_safetensors: True never reads a pickle; None (--allow-pickle) still loads safetensors where there are
        # any and falls back to a pickle, read with weights_only=True: tensors and plain containers, never an object
        # whose unpickling runs code.
        # ignore_mismatched_sizes: a weight of the wrong shape comes back in the loading info, refused below by name
        # and shapes (transformers' own error points at a printed report that --quiet hides)
        # dtype: the weights' own (load_dtype), never config.json's alone
        loaded, info = model_class.from_pretrained(model, config=config, dtype=load_dtype(model, config),
                                                   use_safetensors=None if allow_pickle else True,
                                                   weights_only=True, output_loading_info=True,
                                                   ignore_mismatched_sizes=True, **_hub(model))
    except pickle.UnpicklingError as exc:
        raise ModelLoadError(
            f"refused to load the pickled weights of '{model}': they hold more than tensors "
            f"(torch.load(weights_only=True) says: {_first_line(exc)})",
            "a checkpoint of tensors only, ideally in safetensors format",
            "get a model.safetensors version of the checkpoint; never load pickles you do not trust",
        ) from None
    except (OSError, ValueError, RuntimeError, EOFError, SafetensorError) as exc:  # SafetensorError: truncated, corrupt
        pickled = "" if allow_pickle or list(Path(model).glob("*.safetensors")) else \
            ", or pass --allow-pickle for a trusted .bin checkpoint"
        raise ModelLoadError(
            f"cannot load weights for '{model}' ({type(exc).__name__}: {_first_line(exc)})",
            "complete safetensors weights matching config.json",
            f"re-download or re-save the checkpoint (save_pretrained){pickled}",
        ) from None
    except BUILD_ERRORS as exc:
        raise unbuildable(model_class, model, exc) from None
    check_loaded_weights(model, loaded, info)
    source = {"model": recorded_source(model), "config_sha256": digest, "random_weights": False,
              "transformers_version": transformers.__version__, "dtype": stored_dtype(loaded)}
    return LoadedModel(family, loaded.eval(), tokenizer, processor, source)


# what transformers' model code raises on a config value it does not handle (a real checkpoint's load is
# ModelLoadError "cannot load weights" for OSError / ValueError / RuntimeError, read first)
BUILD_ERRORS = (TypeError, IndexError, KeyError, AttributeError, NotImplementedError)


def unbuildable(model_class, model: str, exc: Exception) -> ModelLoadError:
    """transformers failing to build ``model_class`` from the config (its own code, on a value it does not handle:
    IDEFICS' ``alpha_initializer="normal"`` calls torch.normal with an int size), not a fault of mmedge's."""
    import transformers

    return ModelLoadError(f"transformers {transformers.__version__} could not build {model_class.__name__} from "
                          f"'{model}' ({type(exc).__name__}: {_first_line(exc)})",
                          "a config.json whose values this transformers release builds",
                          "check the config's values (initializers, layer counts) against the model's documentation, "
                          "or try another transformers release")


SAFETENSORS_FLOATS = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}  # header names


def load_dtype(model: str, config) -> str:
    """The dtype ``from_pretrained`` loads the checkpoint in: the one most of its floating-point weight bytes are
    stored in, so a BF16 checkpoint takes half the memory of FP32 until each exported part is upcast
    (``upcast_to_fp32``); the modules a model class keeps in FP32 (BLIP-2's Q-Former in an FP16 checkpoint) stay so,
    as transformers keeps them. transformers' ``"auto"`` takes config.json's ``dtype`` where it has one, and configs
    that say float16 of weights stored in float32 exist: those weights had been rounded to FP16 on load, and the
    export's parity, measured against the same rounded model, could not tell. The safetensors headers tell (a
    folder's, a cached hub snapshot's, or the hub's own metadata online); where they cannot (pickled weights, no
    answer) ``config`` has its dtype set aside and ``"auto"`` reads the first weight's. A config.json that disagrees
    is warned about. Returns a torch dtype's name, or ``"auto"``."""
    said = getattr(config, "dtype", None)
    said = str(said).replace("torch.", "") if said is not None else None
    stored = _stored_float_bytes(model)
    config.dtype = None  # "auto" then reads the weights, not this
    if not stored:
        return "auto"
    chosen = max(stored, key=lambda dtype: stored[dtype])
    if said is not None and said != chosen:
        warn(f"config.json of '{model}' says dtype {said}, but its weights are stored as {chosen}: they are loaded "
             "as stored (the export's graphs are FP32 either way)")
    return chosen


SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


def _stored_float_bytes(model: str) -> dict[str, int]:
    """Bytes of floating-point weights per dtype in the safetensors weights of ``model``, from their headers (no
    weight is read); empty where they cannot be told."""
    if _local_folder(model):
        return _header_bytes(Path(model))
    try:
        from mmedge.export.hub import hub_options

        if hub_options(model).get("local_files_only"):
            from huggingface_hub import snapshot_download

            return _header_bytes(Path(snapshot_download(model, local_files_only=True)))
        from huggingface_hub import get_safetensors_metadata

        counts = get_safetensors_metadata(model).parameter_count  # {"F16": parameters, ...}
        return {SAFETENSORS_FLOATS[kind]: count * SAFETENSORS_BYTES[kind] for kind, count in counts.items()
                if kind in SAFETENSORS_FLOATS}
    except Exception:  # no answer, no safetensors, not cached whole: the load itself reports what is wrong
        return {}


def _header_bytes(folder: Path) -> dict[str, int]:
    """``_stored_float_bytes`` of the safetensors files ``from_pretrained`` loads from ``folder``; empty where there
    are none or a header cannot be read (the load then reports the file)."""
    index = folder / "model.safetensors.index.json"
    try:
        files = (sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
                 if index.is_file() else [folder / "model.safetensors"])
        stored: dict[str, int] = {}
        for path in files:
            with path.open("rb") as handle:
                size = int.from_bytes(handle.read(8), "little")
                if not 0 < size <= path.stat().st_size - 8:
                    return {}
                header = json.loads(handle.read(size))
            for name, entry in header.items():
                if name != "__metadata__" and entry.get("dtype") in SAFETENSORS_FLOATS:
                    start, end = entry["data_offsets"]
                    dtype = SAFETENSORS_FLOATS[entry["dtype"]]
                    stored[dtype] = stored.get(dtype, 0) + int(end) - int(start)
        return stored
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def stored_dtype(model) -> str:
    """The dtype the checkpoint was loaded in (``load_dtype``: its stored one), as the manifest records it."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return "+".join(sorted(str(d).replace("torch.", "") for d in dtypes)) or "float32"


def upcast_to_fp32(module) -> int:
    """Cast the floating-point weights of ``module`` (part of a checkpoint loaded as BF16/FP16) to FP32 in place,
    just before its PyTorch references are taken and it is traced: graphs and references are FP32 whatever the
    checkpoint's storage. Returns the parameters converted (0 for an FP32 model)."""
    import torch

    low = [p for p in module.parameters() if p.is_floating_point() and p.dtype != torch.float32]
    if low:
        module.float()
    return sum(p.numel() for p in low)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _sentencepiece_only(model: str) -> str | None:
    """The SentencePiece model file of a local checkpoint whose tokenizer is stored as that alone (no
    tokenizer.json: T5's spiece.model, LLaMA's tokenizer.model, as older repos have them), else None."""
    folder = Path(model)
    if not folder.is_dir() or (folder / "tokenizer.json").is_file():
        return None
    return next((name for name in ("spiece.model", "tokenizer.model") if (folder / name).is_file()), None)


def _load_preprocessors(model: str, config):
    """The checkpoint's tokenizer and image processor, refused when the tokenizer lacks its vocabulary or the
    processor's images are not the size ``config``'s vision tower takes (``checkpoint_checks``)."""
    import transformers

    from mmedge.export.preprocessing import preprocess_config_from_hf

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model, **_hub(model))
        processor = transformers.AutoImageProcessor.from_pretrained(model, **_hub(model))
    except (OSError, ValueError, ImportError) as exc:
        sentencepiece = _sentencepiece_only(model)
        if sentencepiece:
            raise ModelLoadError(
                f"cannot load the tokenizer of '{model}': it is stored as a SentencePiece model only ({sentencepiece}, "
                "no tokenizer.json), which transformers converts with the sentencepiece package (without it, it "
                "tries tiktoken and asks for that instead)",
                "a tokenizer.json beside config.json, or the sentencepiece package to convert the model",
                "pip install sentencepiece, or save a tokenizer.json on a machine that has it "
                "(AutoTokenizer.from_pretrained(folder).save_pretrained(folder))",
            ) from None
        raise ModelLoadError(
            f"cannot load the tokenizer or image processor of '{model}' ({str(exc).splitlines()[0][:200]})",
            "a tokenizer (tokenizer.json, or a slow tokenizer's files such as vocab.json + merges.txt) and "
            "preprocessor_config.json beside config.json (--random-weights too reads them there)",
            "save them with tokenizer.save_pretrained / processor.save_pretrained into the checkpoint folder; for "
            "random weights without them, pass a bundled config name (mmedge export --help)",
        ) from None
    check_tokenizer(model, tokenizer, getattr(config.get_text_config(), "vocab_size", None))
    check_image_size(model, preprocess_config_from_hf(processor), config)
    if str(getattr(config, "model_type", "")).startswith("instructblip"):  # its Q-Former reads the instruction too
        from mmedge.export.families.instruction import checkpoint_qformer_tokenizer

        checkpoint_qformer_tokenizer(model, config.qformer_config)
    return tokenizer, processor


def _bundled_config(name: str) -> dict | None:
    for path in CONFIG_DIR.glob("*.json"):
        entry = json.loads(path.read_text())
        if entry["model"] == name:
            return entry
    return None


def _not_bundled(model: str) -> ModelLoadError:
    return ModelLoadError(
        f"'{model}' is neither a bundled config nor a folder with config.json",
        f"one of {', '.join(known_random_configs())}, or a checkpoint folder",
        "pick a bundled name (listed by `mmedge export --help`) or pass a folder",
    )


def _load_random(model: str, seed: int) -> LoadedModel:
    import torch
    import transformers

    entry = _bundled_config(model)
    folder = Path(model)
    if entry is not None:
        config = transformers.AutoConfig.for_model(**entry["config"])
        tokenizer = processor = None
    elif (folder / "config.json").is_file():
        config = transformers.AutoConfig.from_pretrained(model)
        tokenizer, processor = _load_preprocessors(model, config)
    else:
        raise _not_bundled(model)
    family = _family_of(config)
    from mmedge.export.families import FAMILIES

    spec = FAMILIES[family]
    torch.manual_seed(seed)
    try:
        loaded = spec.model_class()(config).eval()
    except (*BUILD_ERRORS, ValueError) as exc:  # from_pretrained's ValueError is a weight file's: not here
        raise unbuildable(spec.model_class(), model, exc) from None
    if tokenizer is None:
        tokenizer = spec.synthetic_tokenizer(config)
        processor = entry["preprocess"]  # already in the manifest's preprocessing form
    source = {"model": recorded_source(model), "config_sha256": config_sha256(config), "random_weights": True,
              "seed": seed}
    return LoadedModel(family, loaded, tokenizer, processor, source)
