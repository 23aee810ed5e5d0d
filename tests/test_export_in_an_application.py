"""An export run inside someone else's program leaves its logging as it found it, and silences only the libraries it
drives: ONNX Runtime's quantizer called ``logging.info`` on the root logger, which ran ``basicConfig`` and left a
stderr handler there for good (the application's own ``basicConfig`` afterwards did nothing), and the root logger was
raised to ERROR while quantizing (the application's own root-logger warnings were dropped)."""

from __future__ import annotations

import logging

from mmedge.export import export_model
from mmedge.export.quantize import quiet


class Kept(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def test_a_quantized_export_leaves_the_root_logger_as_it_was(tiny_clip_dir, tmp_path):
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    for handler in handlers:  # as in an application that has not set logging up (pytest adds its own)
        root.removeHandler(handler)
    try:
        export_model(str(tiny_clip_dir), tmp_path / "int8", precision="int8", progress=False)
        assert root.handlers == [] and root.level == level and root.filters == []
        assert logging.getLogger("onnxruntime").level == logging.NOTSET
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)


def test_the_applications_own_records_pass_while_the_quantizer_is_quiet():
    root, kept = logging.getLogger(), Kept()
    root.addHandler(kept)
    try:
        with quiet():
            logging.warning("the application's warning")
            logging.getLogger("myapp").warning("a module's warning")
            logging.getLogger("onnxruntime.quantization.test").warning("the quantizer's")
    finally:
        root.removeHandler(kept)
    assert [r.getMessage() for r in kept.records] == ["the application's warning", "a module's warning"]


def test_mmedge_warnings_are_one_category_given_at_the_callers_line(clip_artifacts, tiny_clip_dir, tmp_path, photos):
    """Every warning is an MmedgeWarning (one filter silences them all), located in the caller's code however deep
    in mmedge it was given (the truncation warning named mmedge/pipelines/common.py, the export's warnings
    mmedge's own files)."""
    import shutil
    import warnings

    import mmedge

    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(photos[0], images / "one.jpg")
    with mmedge.load(clip_artifacts("fp32")) as classifier, warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        classifier(photos[0], labels=["a " + "very " * 100 + "long label", "dog"])
        export_model(str(tiny_clip_dir), tmp_path / "static", precision="int8", quantization="static",
                     calibration=str(images), progress=False)
    assert {w.category for w in seen} == {mmedge.MmedgeWarning}, [(w.category, str(w.message)) for w in seen]
    truncated = next(w for w in seen if "were truncated" in str(w.message))
    calibration = next(w for w in seen if "--calibration folder" in str(w.message))
    assert truncated.filename == calibration.filename == __file__, (truncated.filename, calibration.filename)


def test_an_int4_export_in_a_fresh_process_leaves_the_root_logger_as_it_was(tiny_blip2_dir, tmp_path):
    """ONNX Runtime's MatMulNBits quantizer calls logging.basicConfig(level=INFO) when it is first imported: in a
    fresh process (no earlier import) that left a stderr handler and level INFO on the root for good."""
    import subprocess
    import sys

    script = (
        "import logging, sys\n"
        "from mmedge.export import export_model\n"
        "export_model(sys.argv[1], sys.argv[2], llm_precision='int4', progress=False)\n"
        "root = logging.getLogger()\n"
        "print(len(root.handlers), root.level, len(root.filters), logging.getLogger('onnxruntime').level)\n")
    done = subprocess.run([sys.executable, "-c", script, str(tiny_blip2_dir), str(tmp_path / "int4")],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", str(logging.WARNING), "0", "0"], done.stdout + done.stderr
