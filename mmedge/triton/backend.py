"""What runs inside Triton's Python backend: the models ``mmedge triton`` writes import these classes.

- ``ComponentModel`` (``--platform python``): one artifact component through mmedge's own ONNX Runtime runner
  (``mmedge.runtimes.registry.create_runner``), its graph's sha256 checked against the manifest before the session
  is made. Triton's dynamic batcher hands it several requests at once: requests whose tensors agree beyond the
  batch axis run as one graph call (``run_grouped``).
- ``PipelineModel``: an mmedge pipeline (CLIP zero-shot or embeddings, BLIP-2 / IDEFICS captioning) whose
  components are the repository's component models, called through BLS (``BlsRunner``), so requests from many
  clients meet in the encoders' dynamic batcher. Preprocessing, the label cache, prompts and the generation loop
  are mmedge's own (the pipeline classes ``mmedge.load`` returns, over BLS runners). ``execute`` hands each request
  to a worker thread and returns at once; a worker answers through the request's response sender (the
  ``-stream`` model is decoupled and sends the caption in pieces as tokens arrive, then a last response with the
  answer's ``finish_reason`` and ``tokens``; a stream whose client went away, which Triton marks cancelled, stops at
  its next BLS call: ``cancellable``). Each worker generates with its own KV cache (``RunnerDecoder`` over a BLS
  runner of the decoder model: the cache travels with each call, so the decoder model holds no state and any
  instance can serve any step).
- The zero-shot pipeline is a row model (``mmedge.triton.protocol``): Triton's dynamic batcher queues its requests
  and ``execute`` answers all of them at once, the images of the whole batch in one graph call
  (``mmedge.triton.rows``): the encoder is batched across requests at the pipeline, not behind it. With
  ``"graphs": "inline"`` (the python platform's default) it runs its graphs in its own process through the same
  runner a component model would use (``local_runner``), saving a second Python-backend hop per request; with
  ``--gpu`` its instances are GPU instances, each running its graphs on the device Triton placed it on.

Errors: an ``MmedgeError`` becomes an error response with mmedge's message (INVALID_ARG for bad input; any other
error's message starts with ``protocol.FAILURE_PREFIXES``), and the model keeps serving.
``triton_python_backend_utils`` exists only inside Triton's stub, so it is imported when a model is built;
``ServedPipeline`` and ``run_grouped`` work without it (tests run them in-process).
"""

from __future__ import annotations

import contextlib
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from mmedge.artifact import Artifact
from mmedge.errors import BackendError, InputError, MmedgeError
from mmedge.generation import TextStream
from mmedge.manifest import MANIFEST_FILE, parse_manifest
from mmedge.pipelines.captioner import vqa_prompt
from mmedge.runner import Runner
from mmedge.triton.config import PARAMETER
from mmedge.triton.protocol import (
    SERVER_FAILURE,
    blobs_of,
    check_prompt_or_question,
    generation_of,
    is_base64,
    one_row,
    one_text,
    text_tensor,
    texts_of,
)


def _pb():
    import triton_python_backend_utils as pb_utils  # only inside Triton's Python-backend stub

    return pb_utils


def open_model_folder(args: Mapping[str, str]) -> tuple[dict, dict, Artifact]:
    """(model config, mmedge settings, the artifact's manifest view) of the model Triton is initializing: the
    version folder holds the artifact's manifest.json beside the files this model uses."""
    config = json.loads(args["model_config"])
    settings = json.loads(config["parameters"][PARAMETER]["string_value"])
    root = Path(args["model_repository"]) / args["model_version"]
    # record=False: nothing is written into a model repository (Triton may poll it for changes, or it may be mounted
    # read-only); each model hashes its files once per server start, as `mmedge triton` checked them when it wrote it
    return config, settings, Artifact(root.resolve(), parse_manifest((root / MANIFEST_FILE).read_bytes()), record=False)


# --- component models (--platform python) ------------------------------------------------------------
def run_grouped(runner: Runner, feeds: list[dict[str, np.ndarray]], batched: bool) -> list[dict | MmedgeError]:
    """Run each request's feeds, merging the requests whose tensors agree beyond axis 0 into one call (when the
    model is ``batched``); returns each request's outputs, or the MmedgeError that request met. A merged call that
    fails is run again request by request, so only the bad request gets the error."""
    results: list[dict | MmedgeError] = [{}] * len(feeds)
    groups: dict[tuple, list[int]] = {}
    for index, request in enumerate(feeds):
        key = tuple(sorted((n, np.asarray(v).dtype.str, np.shape(v)[1:]) for n,
                           v in request.items())) if batched else (index,)
        groups.setdefault(key, []).append(index)
    for members in groups.values():
        if len(members) > 1:
            try:
                merged = runner.infer({n: np.concatenate([feeds[i][n] for i in members]) for n in feeds[members[0]]})
            except MmedgeError:
                pass
            else:
                offsets = np.cumsum([0, *(len(next(iter(feeds[i].values()))) for i in members)])
                for i, start, stop in zip(members, offsets[:-1], offsets[1:]):
                    results[i] = {n: np.asarray(v)[start:stop] for n, v in merged.items()}
                continue
        for i in members:
            try:
                results[i] = {n: np.asarray(v) for n, v in runner.infer(feeds[i]).items()}
            except MmedgeError as exc:
                results[i] = exc
    return results


def local_runner(artifact: Artifact, name: str, settings: Mapping[str, Any],
                 args: Mapping[str, str] | None = None) -> Runner:
    """mmedge's ONNX Runtime runner of one component, in this process (its graph's sha256 checked first); ``args``:
    what Triton passed ``initialize`` (``runner_options``)."""
    from mmedge.runtimes.registry import create_runner

    return create_runner("onnxruntime", artifact.component_path(name), name, artifact.component(name),
                         **runner_options(settings, args))


def runner_options(settings: Mapping[str, Any], args: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The ``OrtOptions`` of a served graph's runner: the providers, threads and spinning the repository's settings
    name, and on a GPU instance the CUDA device Triton placed it on (``args["model_instance_device_id"]``: each GPU
    instance of a multi-GPU server on its own device, not all of them on device 0)."""
    options: dict[str, Any] = {"providers": tuple(settings["providers"]), "threads": settings.get("threads"),
                               "config_entries": spinning_entries(bool(settings.get("spin")))}
    if "cuda" in options["providers"] and args and args.get("model_instance_kind") == "GPU":
        options["device_id"] = int(args.get("model_instance_device_id", 0))
    return options


def spinning_entries(spin: bool) -> dict[str, str]:
    """ONNX Runtime's spinning settings of a served graph. Its intra-op threads spin while they wait for work, within
    a call (between one op's parallel sections and the next: sleeping there cost a full-size CLIP image tower 5 ms
    per request, 22.3 vs 17.1 ms) and, by default, after it. On a server whose models, pipelines and transport share
    the cores, spinning after a call takes CPU from the other processes, so by default it stops when the call returns
    (``session.force_spinning_stop``); ``--spin`` keeps it, as a one-graph ``mmedge.load`` pipeline does, for a server
    with its cores to itself."""
    return {"session.intra_op.allow_spinning": "1", **({} if spin else {"session.force_spinning_stop": "1"})}


class ComponentModel:
    """Triton Python-backend model of one component (``--platform python``)."""

    def initialize(self, args: dict) -> None:
        config, settings, artifact = open_model_folder(args)
        self.batched = int(config.get("max_batch_size", 0)) > 0
        self.runner = local_runner(artifact, settings["component"], settings, args)

    def execute(self, requests: list) -> list:
        pb = _pb()
        feeds = [{t.name(): t.as_numpy() for t in request.inputs()} for request in requests]
        responses = []
        for result in run_grouped(self.runner, feeds, self.batched):
            if isinstance(result, MmedgeError):
                responses.append(pb.InferenceResponse(error=_triton_error(pb, result)))
            else:
                responses.append(pb.InferenceResponse([pb.Tensor(n, np.ascontiguousarray(v)) for n,
                                                       v in result.items()]))
        return responses

    def finalize(self) -> None:
        self.runner.close()


# --- BLS ---------------------------------------------------------------------------------------------
class Cancelled(MmedgeError):
    """The request's client went away (it closed its stream): the pipeline stops at its next component call."""


_request = threading.local()  # ``cancelled``: the check of the request this thread answers now (``cancellable``)


@contextlib.contextmanager
def cancellable(cancelled: Callable[[], bool]) -> Iterator[None]:
    """Within it, each BLS call of this thread first asks ``cancelled()`` and raises ``Cancelled`` when it says so:
    a stream whose client went away stops between two decoder steps instead of generating its whole answer."""
    _request.cancelled = cancelled
    try:
        yield
    finally:
        _request.cancelled = None


class BlsRunner(Runner):
    """A runner whose graph is another model of the same Triton server, called through BLS. Feeds are checked
    against the manifest here (mmedge's messages), batches over the model's ``max_batch_size`` are split."""

    backend = "triton"

    def __init__(self, model: str, component_name: str, component: dict, max_batch_size: int = 0):
        super().__init__(component_name, component)
        self.model = model
        self.max_batch_size = max_batch_size

    def _infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = len(next(iter(feeds.values())))
        if not self.max_batch_size or rows <= self.max_batch_size:
            return self._call(feeds)
        parts = [self._call({n: v[i:i + self.max_batch_size] for n, v in feeds.items()})
                 for i in range(0, rows, self.max_batch_size)]
        return {n: np.concatenate([p[n] for p in parts]) for n in parts[0]}

    def _call(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pb = _pb()
        cancelled = getattr(_request, "cancelled", None)
        if cancelled is not None and cancelled():
            raise Cancelled(f"the request was cancelled before Triton model '{self.model}' ran (its client closed "
                            "it)", None, "nothing: the client has gone")
        request = pb.InferenceRequest(model_name=self.model, requested_output_names=list(self._outputs),
                                      inputs=[pb.Tensor(n, v) for n, v in feeds.items()])
        response = request.exec()
        if response.has_error():
            raise BackendError(f"Triton model '{self.model}' (component '{self.component_name}') failed: "
                               f"{response.error().message()}", "the component model loaded and serving",
                               "check the server log and the model's status (GET /v2/models/{model}/ready)")
        return {t.name(): np.array(t.as_numpy()) for t in response.output_tensors()}  # copied out of shared memory


# --- pipelines -----------------------------------------------------------------------------------------
class ServedPipeline:
    """An mmedge pipeline answering the pipeline protocol (``mmedge.triton.protocol``) over runners that
    ``make_runner(component)`` makes (BLS runners in Triton). Thread-safe: captioning workers each get their own
    captioner (own KV cache) over the shared encoders, tokenizer and embedding table."""

    def __init__(self, artifact: Artifact, settings: Mapping[str, Any], make_runner: Callable[[str], Runner]):
        from mmedge.pipelines import pipeline_class
        from mmedge.preprocess import ImagePreprocessor

        manifest = artifact.manifest
        self.kind, self.task = settings["kind"], settings["task"]
        self._class = pipeline_class(manifest["family"], self.task)
        self._artifact = artifact
        self._encoders = {name: make_runner(name) for name in manifest["components"] if name != "decoder"}
        self._preprocessor = ImagePreprocessor(manifest["preprocess"])
        self._tokenizer = _tokenizer(artifact)
        self._local = threading.local()
        self._captioners: list = []
        self._lock = threading.Lock()
        if "decoder" in manifest["components"]:
            from mmedge.embeddings import EmbeddingTable
            from mmedge.runtimes.runner_decoder import RunnerDecoder

            table = EmbeddingTable.of_artifact(artifact)
            self._table = table
            self._new_decoder = lambda: RunnerDecoder.for_artifact(make_runner("decoder"), manifest, table)
            self._captioner()  # the manifest's generation settings are checked now, not at the first request
        else:
            self.pipeline = self._class(artifact, self._encoders, self._preprocessor, self._tokenizer)

    def _captioner(self):
        captioner = getattr(self._local, "captioner", None)
        if captioner is None:
            captioner = self._class(self._artifact, self._encoders, self._preprocessor, self._tokenizer,
                                    self._new_decoder(), self._table)
            self._local.captioner = captioner
            with self._lock:
                self._captioners.append(captioner)
        return captioner

    # --- requests ------------------------------------------------------------------------------------
    def run_rows(self, requests: list[Mapping[str, Any]]) -> list[dict | Exception]:
        """A row model's batch (``mmedge.triton.rows``): each request's outputs, leading axis of 1 included, or the
        exception it met; the images of all the batch's good requests go through the graph in one call."""
        from mmedge.triton.rows import classify_rows

        if self.kind != "zero-shot":
            raise BackendError(f"the {self.kind} pipeline is not a row model", "the zero-shot pipeline",
                               "write the repository again with this version of `mmedge triton`")
        rows: list[dict | Exception] = []
        for inputs in requests:
            try:
                rows.append(one_row(inputs))
            except InputError as exc:
                rows.append(exc)
        answers = iter(classify_rows(self.pipeline, [r for r in rows if not isinstance(r, Exception)]))
        out: list[dict | Exception] = []
        for row in rows:
            answer = row if isinstance(row, Exception) else next(answers)
            out.append(answer if isinstance(answer, Exception) else {n: v[np.newaxis] for n, v in answer.items()})
        return out

    def run(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """One request's inputs (name -> numpy array) -> its outputs."""
        if self.kind == "zero-shot":
            labels = texts_of("labels", inputs["labels"]) if "labels" in inputs else None
            templates = texts_of("templates", inputs["templates"]) if "templates" in inputs else None
            probs = self.pipeline.probabilities(blobs_of("images", inputs.get("images", [])), labels, templates)
            names = labels if labels is not None else self.pipeline.baked_labels
            return {"probs": np.asarray(probs, dtype=np.float32), "label_names": text_tensor(names)}
        if self.kind == "embed":
            out = {}
            if "images" in inputs:
                out["image_embeds"] = self.pipeline.embed_images(blobs_of("images", inputs["images"]))
            if "texts" in inputs:
                out["text_embeds"] = self.pipeline.embed_texts(texts_of("texts", inputs["texts"]))
            if not out:
                raise InputError("the request has neither 'images' nor 'texts'", "images, texts or both to embed",
                                 "send an 'images' (BYTES) or 'texts' (BYTES) input")
            return out
        generation, captioner, items = self._caption_request(inputs)
        if items is not None:
            return {"text": text_tensor([captioner.generate(items, **generation)])}
        images = blobs_of("images", _required(inputs, "images"), is_base64(inputs))
        check_prompt_or_question(inputs.get("prompt"), inputs.get("question"))
        if "question" in inputs:
            return {"text": text_tensor(captioner.ask(images, one_text("question", inputs["question"]), **generation))}
        prompt = one_text("prompt", inputs["prompt"]) if "prompt" in inputs else None
        return {"text": text_tensor(captioner.caption(images, prompt, **generation))}

    def stream(self, inputs: Mapping[str, Any]) -> TextStream:
        """The caption of one image (or interleaved prompt) in pieces, as ``Captioner.stream`` gives them: a
        ``TextStream`` whose ``finish_reason`` and ``tokens`` say how the answer ended once it is exhausted. The
        request's inputs are judged here; the image is decoded when the first piece is asked for."""
        generation, captioner, items = self._caption_request(inputs)
        if items is not None:
            return captioner.stream(items, **generation)
        images = blobs_of("images", _required(inputs, "images"), is_base64(inputs))
        if len(images) != 1:
            raise InputError(f"a streamed caption got {len(images)} images", "one image per streamed request",
                             "send one request per image, or use the unstreamed model for a batch")
        check_prompt_or_question(inputs.get("prompt"), inputs.get("question"))
        prompt = one_text("prompt", inputs["prompt"]) if "prompt" in inputs else None
        if "question" in inputs:
            prompt = vqa_prompt(captioner.vqa_template, one_text("question", inputs["question"]))  # as ask does
        return captioner.stream(images[0], prompt, **generation)

    def _caption_request(self, inputs: Mapping[str, Any]) -> tuple[dict, Any, list | None]:
        """(generation settings, this thread's captioner, the interleaved prompt or None) of a caption request."""
        generation, captioner, items = _generation(inputs), self._captioner(), _interleaved(inputs)
        if items is not None and not hasattr(captioner, "generate"):
            raise InputError("an interleaved prompt was sent to a model without interleaved prompts",
                             "a Flamingo-style (IDEFICS) captioning artifact",
                             "send 'images' and 'prompt' instead of 'items'")
        return generation, captioner, items

    def close(self) -> None:
        with self._lock:
            captioners, self._captioners = self._captioners, []
        for captioner in captioners:
            captioner.decoder.close()
        for runner in self._encoders.values():
            runner.close()


def _tokenizer(artifact: Artifact):
    from mmedge.tokenizer import TextTokenizer

    settings = artifact.manifest.get("tokenizer")
    if not settings:
        return None
    path = (artifact.verified_path(settings["file"], settings["sha256"], "tokenizer.file") if settings.get("sha256")
            else artifact.resolve_file(settings["file"], "tokenizer.file"))
    return TextTokenizer.from_file(path, settings)


def _required(inputs: Mapping[str, Any], name: str) -> Any:
    if name not in inputs:
        raise InputError(f"the request has no '{name}' input", f"'{name}' (BYTES)", f"send '{name}'")
    return inputs[name]


def _generation(inputs: Mapping[str, Any]) -> dict:
    """The request's generation settings; unknown names are refused as ``GenerationConfig.replace`` refuses them (the
    captioner checks the values)."""
    from mmedge.generation import GenerationConfig

    settings = generation_of(inputs["generation"]) if "generation" in inputs else {}
    GenerationConfig().replace(**settings)
    return settings


def _interleaved(inputs: Mapping[str, Any]) -> list | None:
    """An interleaved prompt from ``items`` (BYTES) and ``item_is_image`` (BOOL): images stay bytes, text is decoded."""
    if "items" not in inputs:
        return None
    flags = np.asarray(_required(inputs, "item_is_image")).reshape(-1)
    raw = np.asarray(inputs["items"], dtype=np.object_).reshape(-1)
    if flags.shape != raw.shape or flags.dtype != np.bool_:
        raise InputError(f"'item_is_image' has {flags.size} {flags.dtype} values for {raw.size} items",
                         "one BOOL per item (true: the item is an encoded image, false: UTF-8 text)",
                         "send item_is_image shaped like items")
    base64_text = is_base64(inputs)
    return [blobs_of(f"items[{i}]", [value], base64_text)[0] if image else texts_of(f"items[{i}]", [value])[0]
            for i, (value, image) in enumerate(zip(raw, flags))]


def _triton_error(pb, exc: Exception):
    if isinstance(exc, InputError):
        return pb.TritonError(str(exc), pb.TritonError.INVALID_ARG)
    if isinstance(exc, MmedgeError):  # the prefix tells a gRPC stream's client (no status code there) it failed
        return pb.TritonError(SERVER_FAILURE + str(exc), pb.TritonError.INTERNAL)
    return pb.TritonError(f"mmedge internal error: {type(exc).__name__}: {str(exc)[:500]}; this is a bug in mmedge: "
                          "report it with the server log", pb.TritonError.INTERNAL)


class PipelineModel:
    """Triton Python-backend model of a pipeline (see the module docstring)."""

    def initialize(self, args: dict) -> None:
        pb = _pb()
        config, settings, artifact = open_model_folder(args)
        self.decoupled = pb.using_decoupled_model_transaction_policy(config)
        # the stream's last response says how the answer ended, where the config declares those outputs
        self.sends_ending = {"finish_reason", "tokens"} <= {output["name"] for output in config.get("output", [])}
        components = settings["components"]

        def make_runner(name: str) -> Runner:
            if settings.get("graphs") == "inline":  # the graph in this process: no second Python-backend hop
                return local_runner(artifact, name, settings, args)
            return BlsRunner(components[name]["model"], name, artifact.component(name),
                             components[name]["max_batch_size"])

        self.served = ServedPipeline(artifact, settings, make_runner)
        self.rows = bool(settings.get("rows"))  # Triton batches the requests: execute answers them all at once
        # answered inside execute, no thread hop
        inline = (settings["workers"] == 1 or self.rows) and not self.decoupled
        self.pool = None if inline else ThreadPoolExecutor(settings["workers"],
                                                           thread_name_prefix=f"mmedge-{args['model_name']}")

    def execute(self, requests: list) -> list | None:
        if self.rows:
            results = self.served.run_rows([{t.name(): t.as_numpy() for t in r.inputs()} for r in requests])
            return [self._response(result, r.requested_output_names()) for result, r in zip(results, requests)]
        if self.pool is None:
            return [self._answer({t.name(): t.as_numpy() for t in request.inputs()}) for request in requests]
        for request in requests:
            inputs = {t.name(): np.array(t.as_numpy()) for t in request.inputs()}  # freed when execute returns
            self.pool.submit(self._respond, inputs, request.get_response_sender())
        return None

    def _answer(self, inputs: dict):
        try:
            return self._response(self.served.run(inputs))
        except Exception as exc:  # noqa: BLE001 - every failure is answered; the model serves on
            return self._response(exc)

    @staticmethod
    def _response(outputs: dict | Exception, requested: list[str] | None = None):
        """The response of one request: its outputs (only the ``requested`` ones, when given) or its error."""
        pb = _pb()
        if isinstance(outputs, Exception):
            return pb.InferenceResponse(error=_triton_error(pb, outputs))
        return pb.InferenceResponse([pb.Tensor(n, v if v.dtype == np.object_ else np.ascontiguousarray(v))
                                     for n, v in outputs.items() if not requested or n in requested])

    def _respond(self, inputs: dict, sender) -> None:
        pb = _pb()
        final = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        if not self.decoupled:
            sender.send(self._answer(inputs), flags=final)
            return
        try:
            with cancellable(sender.is_cancelled):  # a client that closed its stream stops the generation
                stream = self.served.stream(inputs)
                for piece in stream:
                    sender.send(pb.InferenceResponse([pb.Tensor("text", text_tensor([piece]))]))
        except Cancelled as exc:
            sender.send(pb.InferenceResponse(error=pb.TritonError(str(exc), pb.TritonError.CANCELLED)), flags=final)
            return
        except Exception as exc:  # noqa: BLE001 - every failure is answered; the model serves on
            sender.send(pb.InferenceResponse(error=_triton_error(pb, exc)), flags=final)
            return
        if not self.sends_ending:  # a repository of an earlier mmedge: its config has no such outputs
            sender.send(flags=final)
            return
        ending = {"finish_reason": text_tensor([stream.finish_reason]),
                  "tokens": np.array([stream.tokens], dtype=np.int64)}
        sender.send(pb.InferenceResponse([pb.Tensor(n, v) for n, v in ending.items()]), flags=final)

    def finalize(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        self.served.close()
