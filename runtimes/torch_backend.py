"""PyTorch backend: the checkpoint's own modules, FP16/BF16 with CUDA graphs on an NVIDIA GPU, FP32 on a CPU.

The artifact carries the checkpoint's weights when it was exported with ``mmedge export --with-pytorch``
(``pytorch/``: config.json and safetensors, every file's sha256 in the manifest; no pickle is ever read), or the
backend is pointed at a local checkpoint folder (``checkpoint=``). The family's model class is rebuilt from it
(``from_pretrained``, safetensors only) and each component runs the same wrapper module the exporter traced
(``mmedge.export.families.<family>.reference_module``), so inputs and outputs are the manifest's, by name.
This is the one backend that reads the host room, on purpose and only inside functions: running the very module
whose trace became the ONNX graph is what makes the torch path comparable to the graphs; a copy of those wrappers
on the device side would drift. It needs the ``mmedge[torch]`` extra (torch, transformers) on the device anyway.

- **Device and precision.** ``device="auto"``: CUDA when ``torch.cuda.is_available()``, else the CPU.
  ``dtype``: float16 on CUDA, float32 on a CPU by default; bfloat16 on request. Modules the model class keeps in
  FP32 (BLIP-2's Q-Former) stay FP32, as transformers loads them. Outputs are cast to the manifest's dtypes.
- **One model per artifact.** Runners of one artifact (and the decoder, ``mmedge.runtimes.torch_decoder``) share
  one loaded model per (weights, device, dtype); it is freed when the last of them is closed.
- **CUDA graphs (CUDA only).** Each component captures one ``torch.cuda.CUDAGraph`` per distinct input shape
  (batch size, text length), up to ``max_graphs``, after warm-up runs on its own stream; later calls copy the feeds
  (from pinned host buffers, asynchronously) into the graph's static inputs and replay it; the cast to the model's
  dtype and to the manifest's output dtypes happens inside the graph, and host outputs come back through pinned
  buffers with one synchronization per call. Shapes past the limit run without a graph. A capture that fails (an op
  that synchronizes with the host) is logged once and that shape runs without a graph
  (``mmedge.runtimes.torch_graphs``).
- **Compilation.** ``compile`` (None: on wherever CUDA graphs are) runs each component under
  ``torch.compile(fullgraph=True)`` with inductor, captured inside the CUDA graph: fused kernels, no Python per call.
  A component that cannot compile is logged and runs uncompiled.
- **Outputs on the GPU.** ``keep_on_device=True`` returns ``TorchDeviceArray``\\ s: a torch CUDA tensor that another
  torch or TensorRT runner takes without a copy (``__cuda_array_interface__``, DLPack), that numpy reads with a copy
  (``np.asarray``). By default outputs are numpy arrays.
- **LLM weights in INT8 / NF4** (``mmedge.runtimes.torch_bnb``): bitsandbytes ``Linear8bitLt`` (LLM.int8, outlier
  threshold 6.0) or ``Linear4bit`` (NF4, compute in the model's dtype, no double quantization) replace the LLM's
  ``nn.Linear`` layers, except its output head, as transformers' ``BitsAndBytesConfig`` defaults do; layers
  narrower than 64 inputs stay float for NF4. Only the decoder asks for it.

``torch``, ``transformers`` and ``bitsandbytes`` are imported when a runner is created, never at import time;
without them this module imports, and using it raises BackendUnavailableError with the install command.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmedge.errors import BackendError, BackendUnavailableError, FeedError, InputError, ModelLoadError
from mmedge.runner import DeviceArray, Runner, TensorMeta
from mmedge.runtimes.torch_bnb import QUANTIZATIONS, output_head_names, quantize_linear_layers
from mmedge.runtimes.torch_checkpoint import refuse_another_size
from mmedge.runtimes.torch_graphs import (
    DEFAULT_MAX_GRAPHS,
    Compiled,
    GraphCache,
    HostBuffers,
    as_tuple,
    compile_backend,
)
from mmedge.runtimes.torch_settings import DTYPE_NAMES, PRECISION_OF_DTYPE, TorchSettings

log = logging.getLogger("mmedge")

INSTALL = 'pip install "mmedge[torch]" (torch and transformers; add bitsandbytes for INT8/NF4 LLM weights)'


# --- lazy imports ----------------------------------------------------------------------------------
def import_torch():
    """The ``torch`` module, with transformers importable beside it, or BackendUnavailableError with the install
    command."""
    try:
        import torch
    except ImportError as exc:
        raise BackendUnavailableError("backend 'torch' needs the Python package 'torch', which cannot be "
                                      f"imported ({exc})",
                                      "torch >= 2.4 and transformers >= 5 importable", INSTALL) from None
    try:
        import transformers  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailableError(
            f"backend 'torch' needs the Python package 'transformers', which cannot be imported ({exc})",
            "transformers >= 5 importable beside torch", INSTALL) from None
    return torch


def torch_dtype(name: str | None, device) -> Any:
    """The torch dtype for a dtype name (None: float16 on CUDA, float32 on a CPU)."""
    torch = import_torch()
    if name is None:
        name = "float16" if device.type == "cuda" else "float32"
    if name not in DTYPE_NAMES:
        raise InputError(f"torch dtype '{name}' is not supported",
                         f"one of {', '.join(sorted(set(DTYPE_NAMES.values())))}",
                         "pass dtype='float16' (CUDA), 'bfloat16' or 'float32'")
    return getattr(torch, DTYPE_NAMES[name])


def resolve_device(device: str | None) -> Any:
    """``torch.device`` for "auto" (CUDA when available), "cpu", "cuda" or "cuda:N"; refuses CUDA torch cannot use."""
    torch = import_torch()
    name = device or "auto"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(name)
    except (RuntimeError, TypeError):
        raise InputError(f"torch device '{name}' is not a device name", "'auto', 'cpu', 'cuda' or 'cuda:N'",
                         "pass device='cuda' or device='cpu'") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        build = getattr(torch.version, "cuda", None)
        raise BackendUnavailableError(
            f"the torch backend was asked for {name}, but torch {torch.__version__} sees no CUDA GPU "
            f"({'a CPU-only build' if build is None else f'built for CUDA {build}'})",
            "an NVIDIA GPU with a driver, and a CUDA build of torch",
            "install a CUDA build of torch (pip install torch --index-url https://download.pytorch.org/whl/cu126), "
            "or pass device='cpu'")
    if chosen.type not in ("cpu", "cuda"):
        raise InputError(f"torch device '{name}' is not supported", "cpu or cuda", "pass device='cuda' or 'cpu'")
    return chosen


# --- the shared model --------------------------------------------------------------------------------
@dataclass
class _Loaded:
    model: Any
    users: int = 0
    decoders: int = 0
    llm_quantization: str | None = None
    quantization_report: dict = field(default_factory=dict)


_MODELS: dict[tuple, _Loaded] = {}
_MODELS_LOCK = threading.Lock()


class ModelHandle:
    """One runner's share of a loaded model; ``release()`` (once) frees the model after its last user."""

    def __init__(self, key: tuple | None, entry: _Loaded, decoder: bool):
        self._key, self._entry, self._decoder = key, entry, decoder
        self._released = False

    @property
    def model(self):
        return self._entry.model

    @property
    def quantization(self) -> dict:
        return dict(self._entry.quantization_report)

    def release(self) -> None:
        with _MODELS_LOCK:
            if self._released:
                return
            self._released = True
            entry = self._entry
            entry.users -= 1
            entry.decoders -= int(self._decoder)
            if entry.users <= 0 and self._key is not None and _MODELS.get(self._key) is entry:
                del _MODELS[self._key]


def weights_folder(artifact, checkpoint: str | Path | None = None) -> Path:
    """The checkpoint folder to load: ``checkpoint`` (a local folder with config.json and safetensors) or the
    artifact's ``pytorch/`` (every file's sha256 checked). ``~`` in ``checkpoint`` is the user's home."""
    if checkpoint is not None:
        folder = Path(checkpoint).expanduser()
        if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
            raise ModelLoadError(
                f"checkpoint folder '{folder}' has no config.json with safetensors weights",
                "a Hugging Face checkpoint folder (config.json + *.safetensors; pickles are never loaded)",
                "point checkpoint= at the folder save_pretrained wrote, or use an artifact exported with "
                "--with-pytorch")
        return folder
    if not artifact.manifest.get("pytorch"):
        raise BackendUnavailableError(
            f"backend 'torch' needs PyTorch weights, and artifact '{artifact.root.name}' was exported without them",
            "an artifact exported with `mmedge export --with-pytorch` (its pytorch/ folder), or a checkpoint folder",
            "re-export with --with-pytorch, pass the torch backend checkpoint=FOLDER, or use backend='onnxruntime'")
    return artifact.pytorch_folder()


def acquire_model(folder: Path, family: str, device, dtype, *, quantization: str | None = None,
                  decoder: bool = False) -> ModelHandle:
    """The family's model loaded from ``folder`` on ``device`` at ``dtype``, shared by the runners of one artifact.

    A decoder asking for INT8/NF4 LLM weights quantizes the shared model's LLM in place while no other decoder uses
    it (encoders never touch the LLM); otherwise it gets a model of its own.
    """
    if quantization not in (None, *QUANTIZATIONS):
        raise InputError(f"LLM quantization '{quantization}' is not supported",
                         f"None or one of {', '.join(QUANTIZATIONS)}", "pass quantization='int8' (LLM.int8) or 'nf4'")
    key = (str(Path(folder).resolve()), family, str(device), str(dtype))
    with _MODELS_LOCK:
        entry = _MODELS.get(key)
        private = False
        if entry is not None and decoder and entry.llm_quantization != quantization:
            if entry.decoders == 0 and entry.llm_quantization is None:
                _quantize_llm(entry, family, quantization, device, dtype)
            else:
                entry, private = None, True
        if entry is None:
            entry = _Loaded(load_reference_model(folder, family, device, dtype))
            if decoder and quantization:
                _quantize_llm(entry, family, quantization, device, dtype)
            if not private:
                _MODELS[key] = entry
        entry.users += 1
        entry.decoders += int(decoder)
    return ModelHandle(None if private else key, entry, decoder)


def _refuse_another_model_type(folder: Path, family: str, expected: str) -> None:
    """A checkpoint of another model type (an IDEFICS folder for a BLIP-2 artifact) would load with every weight
    random, then fail on a shape deep in the pipeline: refused from its config.json first."""
    import json

    try:
        found = json.loads((Path(folder) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return  # from_pretrained says what is wrong with it
    if found != expected:
        raise ModelLoadError(
            f"the checkpoint in '{folder}' is a '{found}' model, and this artifact is {family} ('{expected}')",
            f"a '{expected}' checkpoint: the one the artifact was exported from",
            "point checkpoint= at that checkpoint's folder, or use the artifact's own weights (--with-pytorch)")


def load_reference_model(folder: Path, family: str, device, dtype):
    """``from_pretrained`` of the family's model class (safetensors only), in eval mode, on ``device``."""
    torch = import_torch()
    from mmedge.export.families import FAMILIES

    model_class = FAMILIES[family].model_class()
    _refuse_another_model_type(folder, family, model_class.config_class.model_type)
    try:
        with quiet_transformers():
            model = model_class.from_pretrained(str(folder), dtype=dtype, use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise BackendError(f"transformers could not load the {family} weights from '{folder}' "
                           f"({(str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]})",
                           "config.json and safetensors weights written by `mmedge export --with-pytorch`",
                           "copy the artifact's pytorch/ folder again, or re-export it") from None
    if dtype != torch.float32 and _cast_dtype(model) == torch.float32:
        cast_keeping_fp32_modules(model, dtype)  # a transformers release without the dtype= keyword
    model = model.to(device).eval()
    model.requires_grad_(False)
    return model


def _fp32_module_names(model) -> tuple[str, ...]:
    return tuple(getattr(model, "_keep_in_fp32_modules", None) or ())


def _cast_dtype(model):
    """The dtype of the model's weights outside the modules its class keeps in FP32 (BLIP-2's ``query_tokens`` and
    Q-Former come first in ``parameters()`` and stay FP32 whatever dtype was asked for)."""
    kept = _fp32_module_names(model)
    for name, parameter in model.named_parameters():
        if parameter.is_floating_point() and not any(name == k or name.startswith(f"{k}.") for k in kept):
            return parameter.dtype
    return None


def cast_keeping_fp32_modules(model, dtype):
    """``model`` cast to ``dtype`` in place, but for the modules and parameters its class keeps in FP32
    (``_keep_in_fp32_modules``), as ``from_pretrained(dtype=...)`` loads it."""
    torch = import_torch()
    model.to(dtype)
    for name in _fp32_module_names(model):
        part = getattr(model, name, None)
        if isinstance(part, torch.nn.Parameter):
            part.data = part.data.float()
        elif isinstance(part, torch.nn.Module):
            part.float()
    return model


@contextlib.contextmanager
def quiet_transformers():
    """transformers' progress bars off (a device process logs through mmedge), restored afterwards."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _quantize_llm(entry: _Loaded, family: str, method: str, device, dtype) -> None:
    from mmedge.export.families import FAMILIES

    llm = FAMILIES[family].reference_language_model(entry.model)
    if llm is None:
        raise BackendError(f"the {family} family has no language model the torch backend decodes with",
                           "a BLIP-2-style causal LLM", "run the decoder on ONNX Runtime (backend='auto')")
    entry.quantization_report = quantize_linear_layers(llm, method, compute_dtype=dtype, device=device,
                                                       skip=output_head_names(llm))
    entry.llm_quantization = method


# --- outputs left on the GPU ---------------------------------------------------------------------
class TorchDeviceArray(DeviceArray):
    """A torch tensor left on the GPU by a torch runner for the next stage.

    Another torch runner or a TensorRT runner takes it as a feed without a copy; CuPy / Numba read it through
    ``__cuda_array_interface__``, anything DLPack-aware through ``__dlpack__``; ``np.asarray`` (or ``numpy()``)
    copies it to the host. ``tensor`` is the torch tensor itself.
    """

    def __init__(self, tensor):
        self.tensor = tensor
        self.shape = tuple(tensor.shape)
        self.ndim = tensor.dim()
        self.dtype = np.dtype(str(tensor.dtype).replace("torch.", ""))

    @property
    def __cuda_array_interface__(self) -> dict:
        return self.tensor.__cuda_array_interface__

    def __dlpack__(self, *args, **kwargs):
        return self.tensor.__dlpack__(*args, **kwargs)

    def __dlpack_device__(self):
        return self.tensor.__dlpack_device__()

    def numpy(self) -> np.ndarray:
        return self.tensor.detach().cpu().numpy()

    def device_name(self) -> str:
        return str(self.tensor.device)


# --- the runner ------------------------------------------------------------------------------------
class TorchRunner(Runner):
    """One component: the family's wrapper module around the shared model, under ``torch.inference_mode``."""

    backend = "torch"
    device_feeds_contiguous = False  # torch copies a strided GPU array into its static input

    def __init__(self, module, component_name: str, component: dict, *, device, dtype, cuda_graphs: bool | None = None,
                 compile: bool | str | None = None, keep_on_device: bool = False, max_graphs: int = DEFAULT_MAX_GRAPHS,
                 handle: ModelHandle | None = None):
        super().__init__(component_name, component)
        self.torch = torch = import_torch()
        self.device, self.dtype = device, dtype
        self._module = module
        self._handle = handle
        self._input_names = list(component["inputs"])  # the wrapper's forward takes them in this order
        self._output_names = list(component["outputs"])
        self._output_dtypes = [getattr(torch, self._outputs[n].dtype) for n in self._output_names]
        self.keep_on_device = bool(keep_on_device) and device.type == "cuda"
        self.cuda_graphs = device.type == "cuda" if cuda_graphs is None else bool(cuda_graphs) and device.type == "cuda"
        self._fn = Compiled(self._run_module, compile_backend(compile, default=self.cuda_graphs), component_name)
        self._graphs = GraphCache(self._fn, device, max_graphs, component_name,
                                  self._static_dtype) if self.cuda_graphs else None
        self._host = HostBuffers(device)
        self._lock = threading.Lock()
        self._closed = False

    @property
    def precision(self) -> str:
        return PRECISION_OF_DTYPE[str(self.dtype).replace("torch.", "")]

    @property
    def compile_status(self) -> str:
        return self._fn.status

    def graph_report(self) -> dict:
        """Captured graph shapes and failed captures (empty off CUDA), and whether the module runs compiled."""
        if self._graphs is None:
            return {"cuda_graphs": False, "compile": self._fn.status}
        return {"cuda_graphs": True, "compile": self._fn.status,
                "captured": [[list(s) for s, _ in k] for k in self._graphs.graphs],
                "failed": {str([list(s) for s, _ in k]): why for k, why in self._graphs.failed.items()}}

    # --- feeds ----------------------------------------------------------------------------------
    def _check_one(self, meta: TensorMeta, value: Any):
        """torch tensors (CPU or GPU) are checked here; numpy and other device arrays by ``Runner``."""
        torch = self.torch
        if not isinstance(value, torch.Tensor):
            return super()._check_one(meta, value)
        want = getattr(torch, meta.dtype)
        if value.dtype != want and not (value.is_floating_point() and want.is_floating_point):
            raise FeedError(f"component '{self.component_name}' input '{meta.name}' is a tensor of dtype {value.dtype}",
                            f"{meta.dtype}", f"convert it with .to(torch.{meta.dtype})")
        if value.dim() != len(meta.shape) or any(w is not None and w != g for w, g in zip(meta.shape, value.shape)):
            raise FeedError(f"component '{self.component_name}' input '{meta.name}' has shape {list(value.shape)}",
                            f"shape {self._describe(meta)}", "reshape the input to the declared shape")
        return value

    def _accepts_device_dtype(self, meta: TensorMeta, dtype: np.dtype) -> bool:
        """Floats of any width are cast to the runner's compute dtype; other dtypes must match."""
        return dtype == np.dtype(meta.dtype) or (dtype.kind == "f" and np.dtype(meta.dtype).kind == "f")

    def _device_feed(self, meta: TensorMeta, value: Any):
        """A torch backend array as its tensor; another GPU array (a TensorRT DeviceTensor, CuPy) as a tensor over the
        same memory, no copy; a device array in host memory copied."""
        if isinstance(value, TorchDeviceArray):
            return value.tensor
        if hasattr(value, "__cuda_array_interface__"):
            return self.torch.as_tensor(value, device=self.device)
        return np.asarray(value)

    def _static_dtype(self, dtype):
        """The dtype a feed of ``dtype`` runs at: the runner's compute dtype for floats, integers as they are."""
        return self.dtype if dtype.is_floating_point else dtype

    def _to_device(self, value):
        torch = self.torch
        if isinstance(value, np.ndarray) and not value.flags.writeable:  # torch warns of sharing a read-only array
            value = value.copy()
        tensor = torch.from_numpy(value) if isinstance(value, np.ndarray) else value
        return tensor.to(device=self.device, dtype=self._static_dtype(tensor.dtype), non_blocking=True).contiguous()

    # --- running ---------------------------------------------------------------------------------
    def _run_module(self, *tensors) -> tuple:
        """The wrapper module, its outputs cast to the manifest's dtypes (inside the graph on CUDA)."""
        outputs = as_tuple(self._module(*tensors))
        return tuple(value.to(dtype) for value, dtype in zip(outputs, self._output_dtypes))

    def _infer_impl(self, feeds: dict[str, Any]) -> dict[str, Any]:
        torch = self.torch
        with self._lock:
            if self._closed:
                raise BackendError(f"runner for '{self.component_name}' is closed", "an open runner",
                                   "create a new one")
            try:
                with torch.inference_mode():
                    return self._run(feeds)
            except (torch.cuda.OutOfMemoryError if hasattr(torch.cuda, "OutOfMemoryError") else MemoryError) as exc:
                raise BackendError(f"the GPU ran out of memory running component '{self.component_name}' "
                                   f"({str(exc)[:160]})",
                                   "enough free GPU memory for this batch",
                                   "use smaller batches or close other GPU processes") from None
            except RuntimeError as exc:
                raise BackendError(
                    f"torch failed running component '{self.component_name}' "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else 'no detail'})",
                    "feeds matching the component's declared inputs",
                    "check input shapes against runner.input_metadata()",
                ) from None

    def _run(self, feeds: dict[str, Any]) -> dict[str, Any]:
        if self._graphs is None:
            outputs = self._fn(*[self._to_device(feeds[name]) for name in self._input_names])
            if self.keep_on_device:
                return {name: TorchDeviceArray(value) for name, value in zip(self._output_names, outputs)}
            return {name: value.cpu().numpy() for name, value in zip(self._output_names, outputs)}
        # CUDA graphs: host arrays go through pinned buffers into the graph's static inputs (cast there), asynchronously
        staged = [name for name in self._input_names if isinstance(feeds[name], np.ndarray)]
        inputs = [self._host.stage(name, feeds[name]) if name in staged else feeds[name] for name in self._input_names]
        outputs = self._graphs(*inputs)  # static buffers, overwritten by the next replay
        self._host.queued(staged)
        if self.keep_on_device:
            return {name: TorchDeviceArray(value.clone()) for name, value in zip(self._output_names, outputs)}
        pinned = [self._host.fetch(f"out:{name}", value) for name, value in zip(self._output_names, outputs)]
        self.torch.cuda.current_stream(self.device).synchronize()
        return {name: buffer.numpy().copy() for name, buffer in zip(self._output_names, pinned)}

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                if self._graphs is not None:
                    self._graphs.close()
                self._graphs = None
                self._module = None
                if self._handle is not None:
                    self._handle.release()


def create_runner(path, component_name: str, component: dict, *, artifact=None, device: str | None = "auto",
                  dtype: str | None = None, cuda_graphs: bool | None = None, compile: bool | str | None = None,
                  keep_on_device: bool = False, max_graphs: int = DEFAULT_MAX_GRAPHS, checkpoint: str | None = None,
                  **unknown) -> TorchRunner:
    """A runner for one component of an artifact (``artifact``, or the folder holding ``path``), running the
    family's reference module from the artifact's PyTorch weights (or ``checkpoint``)."""
    from mmedge.artifact import Artifact
    from mmedge.backends import refuse_unknown_options

    refuse_unknown_options("torch", unknown, ("artifact", "device", "dtype", "cuda_graphs", "compile", "keep_on_device",
                                              "max_graphs", "checkpoint"))
    import_torch()
    if artifact is None:
        if path is None:
            raise InputError("the torch backend got neither an artifact nor a component path",
                             "artifact= (an mmedge.artifact.Artifact) or the path of a component file",
                             "use mmedge.load(path, backend='torch')")
        artifact = Artifact.open(Path(path).parent)
    chosen = resolve_device(device)
    precision = torch_dtype(dtype, chosen)
    family = artifact.manifest["family"]
    folder = weights_folder(artifact, checkpoint)
    handle = acquire_model(folder, family, chosen, precision)
    try:
        if checkpoint is not None:
            refuse_another_size(artifact.manifest, handle.model, folder)
        module = reference_module(family, component_name, handle.model, artifact)
        for owner in (module._buffers, module._parameters):  # the wrapper's own tensors (a baked label bank)
            for key, value in owner.items():
                if value is not None and value.is_floating_point():
                    value.data = value.data.to(chosen, precision)
    except BaseException:
        handle.release()
        raise
    return TorchRunner(module, component_name, component, device=chosen, dtype=precision, cuda_graphs=cuda_graphs,
                       compile=compile, keep_on_device=keep_on_device, max_graphs=max_graphs, handle=handle)


def reference_module(family: str, component_name: str, model, artifact):
    """The family's wrapper module for a component, with the artifact's reference tensors for it (a baked label
    bank: in the artifact's pytorch/, whichever folder the model's weights came from)."""
    from mmedge.export.families import FAMILIES

    tensors = reference_tensors(artifact, component_name)
    try:
        module = FAMILIES[family].reference_module(component_name, model, artifact.manifest, tensors)
    except KeyError:
        exported = artifact.manifest.get("pytorch")
        if not exported:
            raise BackendError(
                f"the torch backend cannot rebuild component '{component_name}' of artifact '{artifact.root.name}': "
                "it was exported without --with-pytorch, so it lacks the tensors the component holds beyond the "
                "checkpoint's weights (a baked label bank), which a checkpoint folder does not carry",
                "an artifact exported with `mmedge export --with-pytorch` (its pytorch/reference_tensors.safetensors)",
                "re-export with --with-pytorch, or run this artifact on onnxruntime (--backend auto)") from None
        raise BackendError(
            f"the torch backend cannot rebuild component '{component_name}' of a {family} artifact "
            f"(its reference tensors {sorted(tensors) or 'none'} do not make that component)",
            f"a component this mmedge version's {family} family rebuilds, with the tensors its export saved",
            "export the artifact with this mmedge version, or run this component on onnxruntime") from None
    return module


def reference_tensors(artifact, component_name: str) -> dict:
    """The artifact's reference tensors of ``component_name`` (``pytorch/reference_tensors.safetensors``, its sha256
    checked), or {} where the artifact has none."""
    entry = artifact.manifest.get("pytorch") or {}
    name = entry.get("reference_tensors")
    if not name:
        return {}
    if not (artifact.root / entry["folder"]).is_dir():
        artifact.pytorch_folder()  # says the folder is missing (a device copy without it), and what to do
    info = (entry.get("files") or {}).get(name) or {}
    path = artifact.verified_path(name, info.get("sha256", ""), f"pytorch.files.{name}", entry["folder"])
    from safetensors.torch import load_file

    prefix = f"{component_name}."
    return {k[len(prefix):]: v for k, v in load_file(str(path)).items() if k.startswith(prefix)}


__all__ = ["ModelHandle", "TorchDeviceArray", "TorchRunner", "TorchSettings", "acquire_model",
           "cast_keeping_fp32_modules",
           "create_runner", "import_torch", "load_reference_model", "resolve_device",
           "torch_dtype", "weights_folder"]
