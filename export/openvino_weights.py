"""``--openvino-weights``: the FP32 decoder's weights compressed by NNCF at export, for the OpenVINO backend.

OpenVINO runs an INT4/INT8 LLM fastest with its own weight compression (NNCF ``compress_weights``), not with ONNX
Runtime's MatMulNBits graph. The device can do it at first load (``OvOptions.weights``); doing it here instead puts the
compressed model in the artifact as an OpenVINO IR (``decoder.openvino-int4.xml`` + ``.bin``) with its sha256, its
NNCF settings and its parity against PyTorch on the stored validation sample, so the device runs exactly what was
measured and needs no NNCF. The ONNX decoder stays FP32, for every other backend.
"""

from __future__ import annotations

import contextlib
import io
import sys

import numpy as np

from mmedge.errors import ParityError
from mmedge.metrics import cosine_rows


def compress_decoder(builder, spec, weights: str, min_cosine: float) -> dict:
    """Compress ``spec``'s FP32 graph in the stage, write the IR, measure its logits against PyTorch on the stored
    validation sample and gate them at ``min_cosine``; returns the manifest entry (``components.<name>.openvino``)."""
    from mmedge.artifact import sha256_file
    from mmedge.runtimes.openvino.compile import compress_weights, read_model, weights_record
    from mmedge.runtimes.openvino.core import OvOptions, core, import_openvino

    source = builder.stage / f"{spec.name}.onnx"
    entry = builder.entries[spec.name]
    with contextlib.redirect_stdout(sys.stdout if builder.options.progress else io.StringIO()):  # NNCF's progress bar
        model = compress_weights(read_model(source, spec.name), spec.name, entry, weights)
    xml = builder.stage / f"{spec.name}.openvino-{weights}.xml"
    import_openvino().save_model(model, str(xml), compress_to_fp16=False)
    data = xml.with_suffix(".bin")
    feeds, reference = builder.validation_sample(spec)
    compiled = core().compile_model(model, "CPU", OvOptions(threads=builder.options.threads).compile_config())
    result = compiled.create_infer_request().infer(feeds)
    logits = next(np.asarray(value) for port, value in result.items() if "logits" in port.get_names())
    expected = reference["logits"]  # [batch, tokens, vocab]
    cosines = cosine_rows(expected.reshape(-1, expected.shape[-1]), logits.reshape(-1, logits.shape[-1]))
    parity = {"reference": "torch-fp32", "on": "validation sample (decoder prefill after a cached prefix)",
              "logits_cosine_min": float(cosines.min()), "logits_cosine_mean": float(cosines.mean()),
              "max_abs": float(np.abs(expected - logits).max()), "openvino_version": import_openvino().get_version()}
    if parity["logits_cosine_mean"] < min_cosine:
        raise ParityError(spec.name, "logits (OpenVINO, NNCF weights)", "cosine", parity["logits_cosine_mean"],
                          min_cosine, "leave --openvino-weights unset (the device compresses at first load and "
                          "you can measure it there), or use --openvino-weights int8")
    return {"file": xml.name, "sha256": sha256_file(xml), "size_bytes": xml.stat().st_size,
            "weights_file": {"file": data.name, "sha256": sha256_file(data), "size_bytes": data.stat().st_size},
            "weights": weights, "compression": weights_record(weights), "parity": parity}
