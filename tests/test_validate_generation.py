"""`mmedge validate` runs the decoder as generation runs it: the KV-cached decoder ``mmedge.load`` opens, a few greedy
steps, against the plain decoder graph over the same tokens without a cache (``mmedge.generation_check``).

The audit's case: on ONNX Runtime 1.18-1.29 ``OrtDecoder``'s reused IOBinding freed the pasts between steps, every
caption was garbage, and validate (which ran the decoder graph once, as a plain graph) exited 0.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from mmedge.cli import main
from mmedge.errors import ParityError
from mmedge.validate import COSINE_SLACK, PER_TENSOR_ACTIVATIONS_FLOOR, validate_artifact
from tests.support.battery import cli_error

needs_openvino = pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                                    reason='openvino is not installed (pip install "mmedge[openvino]")')
needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")


@pytest.fixture(scope="module")
def quantized_llms(tiny_blip2_dir, tmp_path_factory):
    """The tiny BLIP-2 with its LLM at INT4 (MatMulNBits) and INT8 (dynamic), each exported once here."""
    from mmedge.export import export_model

    root = tmp_path_factory.mktemp("b2-llm")
    return {precision: export_model(str(tiny_blip2_dir), root / precision, progress=False, llm_precision=precision)
            for precision in ("int4", "int8")}


@pytest.fixture
def artifact_of(request, blip2_artifact, blip2_t5_artifact, pytorch_artifacts, quantized_llms):
    """An artifact by kind: the session's tiny exports (``pytorch_artifacts`` for InstructBLIP, IDEFICS, and
    "pytorch-blip2": BLIP-2 with its torch weights), and this module's quantized LLMs."""
    fixed = {"blip2": blip2_artifact, "blip2_t5": blip2_t5_artifact, "int4": quantized_llms["int4"],
             "int8": quantized_llms["int8"]}
    return lambda kind: fixed[kind] if kind in fixed else pytorch_artifacts(kind.removeprefix("pytorch-"))


CASES = [("blip2", "onnxruntime", "fp32"), ("blip2_t5", "onnxruntime", "fp32"),
         ("instructblip", "onnxruntime", "fp32"), ("idefics", "onnxruntime", "fp32"),
         ("int4", "onnxruntime", "int4"), ("int8", "onnxruntime", "int8"),
         pytest.param("blip2", "openvino", "fp32", marks=needs_openvino),
         pytest.param("blip2_t5", "openvino", "fp32", marks=needs_openvino),
         pytest.param("idefics", "openvino", "fp32", marks=needs_openvino),
         pytest.param("int4", "openvino", "int4", marks=needs_openvino),
         pytest.param("pytorch-blip2", "torch", "fp32", marks=needs_torch)]


@pytest.mark.parametrize("kind, backend, precision", CASES)
def test_validate_checks_the_cached_decoder_of_every_family(artifact_of, kind, backend, precision):
    """A sound cache gives the plain graph's logits at the prefill and at every step, within the precision's slack;
    the entry names what it measured against and how far it went."""
    report = validate_artifact(artifact_of(kind), backend=backend)
    decoder = report["decoder"]
    generation = decoder["generation"]
    assert decoder["backend"] == backend and decoder["precision"] == precision
    assert generation["steps"] == 3 and generation["reference"] == "the decoder graph without a cache"
    # dynamic INT8 quantizes activations per call (a token alone vs among the prompt's): the export's own gate
    floor = PER_TENSOR_ACTIVATIONS_FLOOR if precision == "int8" else 1.0 - COSINE_SLACK[precision]
    assert generation["min_cosine"] == pytest.approx(floor)
    assert generation["ok"] and generation["cosine"] >= generation["min_cosine"], generation


def _zeroed_pasts(forward):
    """``OrtDecoder._forward`` whose presents come back as zeros: the next step reads a cache that was not kept, as
    it did where ONNX Runtime freed the IOBinding's outputs."""
    import onnxruntime as ort

    def broken(self, feeds):
        logits = forward(self, feeds)
        self._past = [ort.OrtValue.ortvalue_from_numpy(np.zeros_like(value.numpy()))
                      for value in self._past]
        return logits

    return broken


def _swapped_pasts(forward):
    """A decoder ``_forward`` that hands the next step its pasts in reverse order (layers and keys / values swapped):
    a cache mixed up between calls, for any graph decoder."""

    def broken(self, feeds):
        logits = forward(self, feeds)
        self._past = self._past[::-1]
        return logits

    return broken


def test_a_cache_lost_between_steps_fails_validate(blip2_artifact, monkeypatch, capsys):
    """The graphs still pass their parity (the audit's exit 0); the generation check fails, and the CLI exits with
    the parity code naming it."""
    from mmedge.runtimes.onnxruntime_decoder import OrtDecoder

    monkeypatch.setattr(OrtDecoder, "_forward", _zeroed_pasts(OrtDecoder._forward))
    report = validate_artifact(blip2_artifact, backend="onnxruntime")
    assert all(m["ok"] for entry in report.values() for m in entry["outputs"].values())
    generation = report["decoder"]["generation"]
    assert not generation["ok"] and generation["cosine"] < generation["min_cosine"]
    line = cli_error(capsys, ["validate", blip2_artifact, "--backend", "onnxruntime"], ParityError,
                     "component 'decoder' output 'generation' failed parity", "KV-cached decoder")
    assert "onnxruntime" in line


@needs_openvino
@pytest.mark.parametrize("kind", ["blip2_t5", "idefics"])
def test_a_mixed_up_cache_fails_validate_on_openvino(artifact_of, kind, monkeypatch, capsys):
    """OpenVINO's decoder (two infer requests taking turns), with the context families (Flan-T5's encoder, IDEFICS'
    images): a cache mixed up between steps is caught, and the table marks the check FAIL."""
    from mmedge.runtimes.openvino.decoder import OpenVinoDecoder

    monkeypatch.setattr(OpenVinoDecoder, "_forward", _swapped_pasts(OpenVinoDecoder._forward))
    path = artifact_of(kind)
    assert not validate_artifact(path, backend="openvino")["decoder"]["generation"]["ok"]
    capsys.readouterr()
    assert main(["validate", str(path), "--backend", "openvino"]) == ParityError.exit_code
    out = capsys.readouterr().out
    assert "decoder.generation [fp32, openvino]" in out and out.rstrip().endswith("FAIL")


def test_the_generation_check_is_in_the_json_report(blip2_t5_artifact, capsys):
    assert main(["validate", str(blip2_t5_artifact), "--backend", "onnxruntime", "--json"]) == 0
    generation = json.loads(capsys.readouterr().out)["decoder"]["generation"]
    assert generation["ok"] and set(generation) == {"steps", "reference", "cosine", "max_abs", "min_cosine", "ok"}
