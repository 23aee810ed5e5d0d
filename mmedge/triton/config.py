"""``config.pbtxt`` for each Triton model, derived from an artifact's manifest and nothing else.

A component's tensors map one to one: the manifest's names and dtypes, its fixed sizes as they are and its
named dynamic axes as -1. When every input and output of a component starts with the same named axis (``batch``,
``images``), that axis is Triton's batch dimension: ``max_batch_size`` is set and the dims leave it out; otherwise
``max_batch_size`` is 0 and the dims are the full shapes. Encoders get ``dynamic_batching``, so Triton merges
requests from many clients into one graph call; the decoder (one call per generated token, with a KV cache of the
request's own length) does not.

The text is written by a small protobuf text-format emitter (``render``): the device side needs no protobuf
package. ``tests/test_triton_repository.py`` parses every file with tritonclient's ``model_config_pb2``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

from mmedge.runtimes.tensorrt_planning import is_qdq, provider_fp16

# manifest dtype -> Triton data type (model_config.proto)
TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32",
                 "int8": "TYPE_INT8", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL", "bytes": "TYPE_STRING"}
# every component but the decoder
ENCODERS = ("vision", "text", "zero_shot", "prefix", "qformer", "resampler", "cross_kv", "image_context")
PARAMETER = "mmedge"  # the config parameter holding what the Python-backend models need (JSON)


@dataclass(frozen=True)
class Token:
    """An enum value in text format (written bare: ``TYPE_FP32``, ``KIND_CPU``)."""

    name: str


@dataclass(frozen=True)
class Options:
    """How the repository is served. ``platform``: 'onnxruntime' (Triton's ONNX Runtime backend) or 'python'
    (mmedge's own ONNX Runtime runner in a Python-backend model). ``gpu``: instances on the GPU, and for the
    onnxruntime platform the TensorRT execution accelerator (FP16; INT8 for static-QDQ graphs; FP32 for the float graphs
    FP16 would break, ``_tensorrt_precision``).
    ``max_batch_size``: the most requests' rows Triton merges into one encoder (or zero-shot pipeline) call, and the
    most rows of one decoder call (the pipelines split larger batches).
    ``queue_delay_us``: how long the dynamic batchers wait for more requests (0: none; batches still form from the
    requests that queue while the model runs; refused with ``max_batch_size`` 1, a batch full at once).
    ``instances``: instances per component model (a zero-shot pipeline running its graphs inline has its own,
    ``pipeline_instances``, on the GPU with ``gpu``). ``workers``: the requests one embed or caption pipeline instance
    works on at once (threads, each generating with its own KV cache; 1: each request inside ``execute``, no
    thread); the zero-shot pipeline answers each batch inside ``execute`` (so the next batch queues meanwhile).
    ``pipeline_instances``: instances (stub processes) per pipeline model, each with its own copy of the tokenizer,
    embedding table and label cache. ``threads``: ONNX Runtime intra-op threads per component (None: its default).
    ``spin``: the python platform's ONNX Runtime intra-op threads go on spinning after a call, as ``mmedge.load``'s do
    (for a server with its cores to itself; by default they spin within a call and stop when it returns, leaving the
    CPU to the server's other processes: ``backend.spinning_entries``).
    ``zero_shot_graphs``: where the zero-shot pipeline runs its graphs: 'inline' (in its own process, through
    mmedge's ONNX Runtime runner: one Python-backend hop per request instead of two), 'bls' (calls the component
    models), 'auto' (inline for the python platform, whose component models are that same runner one process away;
    bls for onnxruntime, whose component models are Triton's own backend and its TensorRT accelerator)."""

    platform: str = "onnxruntime"
    gpu: bool = False
    max_batch_size: int = 8
    queue_delay_us: int = 0
    instances: int = 1
    workers: int = 8
    pipeline_instances: int = 1
    threads: int | None = None
    zero_shot_graphs: str = "auto"
    spin: bool = False

    def inline_zero_shot(self) -> bool:
        """Whether the zero-shot pipeline runs its graphs in its own process (``zero_shot_graphs`` resolved)."""
        return self.zero_shot_graphs == "inline" or (self.zero_shot_graphs == "auto" and self.platform == "python")


def render(message: Mapping[str, Any], indent: int = 0) -> str:
    """Protobuf text format of a nested dict: dicts are messages, lists of dicts repeated messages, lists of
    scalars repeated scalars, ``Token`` enum values."""
    pad = "  " * indent
    lines = []
    for key, value in message.items():
        if value is None:
            continue
        if isinstance(value, Mapping):
            lines.append(f"{pad}{key} {{\n{render(value, indent + 1)}{pad}}}")
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            for item in value:
                lines.append(f"{pad}{key} {{\n{render(item, indent + 1)}{pad}}}")
        elif isinstance(value, list):
            lines.append(f"{pad}{key}: [ {', '.join(_scalar(v) for v in value)} ]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return "".join(line + "\n" for line in lines)


def _scalar(value: Any) -> str:
    if isinstance(value, Token):
        return value.name
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string literal is a valid text-format string (escapes included)
    raise TypeError(f"cannot write {type(value).__name__} into config.pbtxt")


def batch_axis(component: Mapping[str, Any]) -> str | None:
    """The named axis every input and output of the component starts with, or None."""
    firsts = {tuple(spec["shape"][:1]) for group in ("inputs", "outputs") for spec in component[group].values()}
    if len(firsts) == 1:
        (first,) = firsts
        if first and isinstance(first[0], str):
            return first[0]
    return None


def tensor(name: str, dtype: str, shape: list, batched: bool) -> dict:
    dims = [d if isinstance(d, int) else -1 for d in (shape[1:] if batched else shape)]
    if not dims:  # a tensor of the batch axis alone: Triton wants one dim, reshaped away
        return {"name": name, "data_type": Token(TRITON_DTYPES[dtype]), "dims": [1], "reshape": {"shape": []}}
    return {"name": name, "data_type": Token(TRITON_DTYPES[dtype]), "dims": dims}


def _parameters(values: Mapping[str, str]) -> list[dict]:
    return [{"key": key, "value": {"string_value": value}} for key, value in values.items()]


def runner_settings(name: str | None, options: Options) -> dict:
    """What a Python-backend model needs to make mmedge's ONNX Runtime runner of a graph."""
    return {**({"component": name} if name else {}), "providers": ["cuda"] if options.gpu else ["cpu"],
            "threads": options.threads, **({"spin": True} if options.spin else {})}


def component_config(model: str, name: str, component: Mapping[str, Any], options: Options,
                     manifest: Mapping[str, Any] | None = None) -> dict:
    """The config of one component's model (see the module docstring); ``manifest``: the artifact's, which says
    whether the component's LLM overflows at FP16 (``_tensorrt_precision``)."""
    batched = batch_axis(component) is not None
    config: dict[str, Any] = {"name": model, "backend": "onnxruntime" if options.platform == "onnxruntime"
                              else "python"}
    if options.platform == "onnxruntime":
        config["default_model_filename"] = component["file"]
    config["max_batch_size"] = options.max_batch_size if batched else 0
    config["input"] = [tensor(n, s["dtype"], s["shape"], batched) for n, s in component["inputs"].items()]
    config["output"] = [tensor(n, s["dtype"], s["shape"], batched) for n, s in component["outputs"].items()]
    if batched and name in ENCODERS:
        config["dynamic_batching"] = {"max_queue_delay_microseconds": options.queue_delay_us}
    config["instance_group"] = [{"kind": Token("KIND_GPU" if options.gpu else "KIND_CPU"), "count": options.instances}]
    if options.platform == "onnxruntime":
        precision = _tensorrt_precision(manifest, name, component) if options.gpu else None
        if precision:
            config["optimization"] = {"execution_accelerators": {"gpu_execution_accelerator": [
                {"name": "tensorrt", "parameters": [  # map<string, string>, unlike the model's parameters
                    {"key": key, "value": value} for key, value in (("precision_mode", precision),
                                                                    ("max_workspace_size_bytes", str(1 << 30)),
                                                                    ("trt_engine_cache_enable", "1"))]}]}}
        if options.threads:
            config["parameters"] = _parameters({"intra_op_thread_count": str(options.threads)})
    else:
        settings = runner_settings(name, options)
        config["parameters"] = _parameters({PARAMETER: json.dumps(settings, sort_keys=True)})
    return config


def _tensorrt_precision(manifest: Mapping[str, Any] | None, name: str, component: Mapping[str, Any]) -> str | None:
    """TensorRT's precision for a component, by mmedge's own rule for ONNX Runtime's TensorRT provider (Triton's
    accelerator is that provider: weakly typed networks, where FP16 lets TensorRT run any layer at FP16): INT8 for a
    static-QDQ graph (explicit quantization); FP16 where ``tensorrt_planning.provider_fp16`` allows it, FP32 for the
    float graphs it keeps at FP32 (an LLM that overflows at FP16, such as Flan-T5's; an FP16 graph with FP32
    islands, ``quantization.fp32_nodes``); none for dynamic-INT8 and INT4 graphs (ONNX Runtime's integer and
    MatMulNBits ops: they run on ONNX Runtime's CUDA provider)."""
    if is_qdq(component):
        return "INT8"
    if component["precision"] in ("fp32", "fp16"):
        return "FP16" if provider_fp16(manifest, name, component) else "FP32"
    return None


def runs_graphs_on_gpu(settings: Mapping[str, Any], options: Options) -> bool:
    """Whether a pipeline model runs graphs on the GPU itself (``--gpu`` with the zero-shot graphs inline): its
    instances are then GPU instances, so Triton places each on a device and its runner uses that one
    (``backend.runner_options``); the other pipelines run only mmedge's loops (CPU instances) and call GPU models."""
    return options.gpu and settings.get("graphs") == "inline"


def pipeline_config(model: str, kind: str, settings: Mapping[str, Any], options: Options, *,
                    decoupled: bool = False) -> dict:
    """The config of a Python-backend pipeline model (``kind``: a key of ``mmedge.triton.protocol.PIPELINES``). A row
    pipeline (``ROW_PIPELINES``: zero-shot) gets ``max_batch_size`` and ``dynamic_batching``, its inputs ragged, so
    Triton hands one ``execute`` every request that queued meanwhile and the model runs their images as one batch."""
    from mmedge.triton.protocol import PIPELINES, ROW_PIPELINES

    spec = PIPELINES[kind]
    rows = kind in ROW_PIPELINES and not decoupled
    config: dict[str, Any] = {"name": model, "backend": "python", "max_batch_size": options.max_batch_size if rows
                              else 0}
    config["input"] = [{**tensor(n, dtype, dims, False), **({"optional": True} if optional else {}),
                        **({"allow_ragged_batch": True} if rows else {})}
                       for n, (dtype, dims, optional) in spec["inputs"].items()]
    config["output"] = [tensor(n, dtype, dims, False) for n, (dtype, dims) in spec["outputs"].items()]
    if rows:
        config["dynamic_batching"] = {"max_queue_delay_microseconds": options.queue_delay_us}
    if decoupled:
        config["model_transaction_policy"] = {"decoupled": True}
    config["instance_group"] = [{"kind": Token("KIND_GPU" if runs_graphs_on_gpu(settings, options) else "KIND_CPU"),
                                 "count": options.pipeline_instances}]
    config["parameters"] = _parameters({PARAMETER: json.dumps({**settings, "workers": options.workers, "rows": rows},
                                                              sort_keys=True)})
    return config
