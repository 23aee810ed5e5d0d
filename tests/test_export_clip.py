"""CLIP export on a tiny random checkpoint: parity, manifest contents, quantization fidelity."""

import json
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch
from transformers import CLIPModel

import mmedge
from mmedge.artifact import Artifact, sha256_file
from mmedge.errors import ArtifactError, InputError, ModelLoadError
from mmedge.export import export_model
from mmedge.validate import load_validation_samples


def manifest(path):
    return json.loads((path / "manifest.json").read_text())


def test_fp32_parity_with_pytorch_on_fresh_shapes(clip_artifacts):
    m = manifest(clip_artifacts("fp32"))
    for name, comp in m["components"].items():
        parity = comp["parity"]
        assert parity["reference"] == "torch-fp32"
        # checked at other sizes than traced (batch 2, length 7)
        assert all(shape[0] == 3 for shape in parity["inputs"].values())
        for output in parity["outputs"].values():
            assert output["cosine"] >= 0.99999 and output["max_abs"] <= 1e-4, (name, output)


def test_fp32_graphs_equal_transformers_features(clip_artifacts, tiny_clip_dir, photos):
    """Independently of the exporter's own check: embeddings equal CLIPModel's on real photos and text."""
    from transformers import AutoImageProcessor, AutoTokenizer

    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    processor = AutoImageProcessor.from_pretrained(tiny_clip_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_clip_dir)
    embedder = mmedge.load(clip_artifacts("fp32"), task="embed")
    texts = ["a photo of a cat", "two people riding bicycles down a city street at night", "x"]
    with torch.no_grad():
        from PIL import Image

        pixels = processor(images=[Image.open(p).convert("RGB") for p in photos[:3]],
                           return_tensors="pt")["pixel_values"]
        ref_img = model.get_image_features(pixel_values=pixels).pooler_output
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        ref_txt = model.get_text_features(**batch).pooler_output
    ref_img = torch.nn.functional.normalize(ref_img, dim=-1).numpy()
    ref_txt = torch.nn.functional.normalize(ref_txt, dim=-1).numpy()
    np.testing.assert_allclose(embedder.embed_images(photos[:3]), ref_img, atol=2e-5)
    np.testing.assert_allclose(embedder.embed_texts(texts), ref_txt, atol=2e-5)


def test_graphs_have_named_dynamic_axes(clip_artifacts):
    path = clip_artifacts("fp32")
    text = onnx.load(str(path / "text.onnx"))
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in text.graph.input]
    assert dims == [["batch", "sequence"], ["batch", "sequence"]]
    m = manifest(path)
    assert m["components"]["vision"]["inputs"]["pixel_values"]["shape"] == ["batch", 3, 32, 32]
    assert m["components"]["text"]["outputs"]["text_embeds"] == {"dtype": "float32", "shape": ["batch", 16]}


def test_manifest_records_source_files_and_hashes(clip_artifacts, tiny_clip_dir):
    path = clip_artifacts("fp32")
    m = manifest(path)
    assert m["family"] == "clip" and m["tasks"] == ["zero-shot", "embed"]
    assert m["source"]["model"] == str(tiny_clip_dir) and m["source"]["random_weights"] is False
    assert len(m["source"]["config_sha256"]) == 64
    assert m["preprocess"]["resize"] == {"shortest_edge": 32}
    assert m["tokenizer"]["file"] == "tokenizer.json" and m["tokenizer"]["max_length"] == 77
    for comp in m["components"].values():
        assert comp["sha256"] == sha256_file(path / comp["file"])
    assert m["validation"]["sha256"] == sha256_file(path / "validation.npz")
    # engines/ is the backends' compiled-model cache (TensorRT, OpenVINO): tests that ran on this artifact may add it
    written = sorted(p.name for p in path.iterdir() if p.name != "engines")
    assert written == ["manifest.json", "text.onnx", "tokenizer.json", "validation.npz", "vision.onnx"]


@pytest.mark.parametrize("variant", ["int8-static", "int8-dynamic", "fused-int8"])
def test_int8_fidelity_is_measured_and_recorded(clip_artifacts, variant):
    m = manifest(clip_artifacts(variant))
    for name, comp in m["components"].items():
        assert comp["precision"] == "int8"
        fidelity = comp["parity"]["fidelity"]
        assert fidelity["reference"] == "onnx-fp32"
        measured_on = fidelity["prompts"] if name == "text" else fidelity["held_out_images"]
        assert measured_on == (10 if name == "text" else 32)
        assert fidelity["embedding_cosine_mean"] >= 0.99, (name, fidelity)
        assert 0.0 <= fidelity["top1_agreement"] <= 1.0
        assert comp["parity"]["fp32_export"]["outputs"]  # the FP32 graph's own parity is kept too


def test_int8_static_is_qdq_with_calibration_recorded(clip_artifacts):
    path = clip_artifacts("int8-static")
    comp = manifest(path)["components"]["vision"]
    assert comp["quantization"]["method"] == "int8-static-qdq"
    assert comp["quantization"]["calibration"]["samples"] == 8
    ops = {n.op_type for n in onnx.load(str(path / "vision.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_int8_is_smaller_than_fp32(clip_artifacts):
    fp32 = Artifact.open(clip_artifacts("fp32"))
    for variant in ("int8-static", "int8-dynamic"):
        int8 = Artifact.open(clip_artifacts(variant))
        assert int8.component_path("vision").stat().st_size < 0.8 * fp32.component_path("vision").stat().st_size


def test_fp16_parity(clip_artifacts):
    m = manifest(clip_artifacts("fp16"))
    for comp in m["components"].values():
        assert comp["precision"] == "fp16"
        assert min(o["cosine"] for o in comp["parity"]["outputs"].values()) >= 0.999


def test_export_refuses_existing_folder_and_leaves_it_untouched(tiny_clip_dir, tmp_path):
    out = tmp_path / "a"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="already exists.*--overwrite"):
        export_model(str(tiny_clip_dir), out, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_failed_export_leaves_no_folder(tiny_clip_dir, tmp_path):
    with pytest.raises(InputError, match="not a CLIP task"):
        export_model(str(tiny_clip_dir), tmp_path / "b", task="caption", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_pickled_weights_are_refused(tiny_clip_dir, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        (folder / name).write_bytes((tiny_clip_dir / name).read_bytes())
    torch.save({}, folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickled weights.*--allow-pickle"):
        export_model(str(folder), tmp_path / "out", progress=False)


def test_unsupported_model_type(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "m" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="model type 'bert' is not supported"):
        export_model(str(tmp_path / "m"), tmp_path / "out", progress=False)


def test_random_weights_from_a_folder_config(tiny_clip_dir, tmp_path):
    out = export_model(str(tiny_clip_dir), tmp_path / "r", random_weights=True, progress=False, seed=3)
    m = manifest(out)
    assert m["source"]["random_weights"] is True and m["source"]["seed"] == 3
    with pytest.warns(mmedge.api.RandomWeightsWarning, match="random weights"):
        mmedge.load(out).close()


def test_graphs_over_the_protobuf_limit_use_one_external_data_file(tiny_clip_dir, tmp_path, monkeypatch, photos):
    """Large graphs (a 2.7B LLM) keep weights in <name>.onnx.data, hashed and verified like the graph."""
    import mmedge.export.onnx_export as onnx_export
    from mmedge.errors import IntegrityError

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 10_000)
    out = export_model(str(tiny_clip_dir), tmp_path / "big", progress=False)
    comp = manifest(out)["components"]["vision"]
    assert comp["external_data"]["file"] == "vision.onnx.data"
    assert comp["external_data"]["sha256"] == sha256_file(out / "vision.onnx.data")
    assert (out / "vision.onnx").stat().st_size * 2 < (out / "vision.onnx.data").stat().st_size
    assert sorted(p.name for p in out.iterdir() if "onnx" in p.name) == ["text.onnx", "text.onnx.data", "vision.onnx",
                                                                         "vision.onnx.data"]
    assert mmedge.load(out)(photos[0], labels=["a", "b"])
    with open(out / "vision.onnx.data", "r+b") as handle:
        handle.write(b"\x01\x02\x03\x04")
    with pytest.raises(IntegrityError, match="vision.onnx.data"):
        mmedge.load(out)


def test_graphs_past_32_mib_store_their_weights_apart_with_the_same_outputs(clip_artifacts, tiny_clip_dir, tmp_path,
                                                                            monkeypatch, photos):
    """A graph past WEIGHTS_APART_BYTES (a ViT-B's, not this tiny one's: the bound is lowered) keeps its weights in
    <name>.onnx.data, so ONNX Runtime maps them instead of holding the protobuf's copy: the same graph, the parity
    measured on it, hashed like it; a small graph stays one file."""
    import mmedge.export.onnx_export as onnx_export

    small = clip_artifacts("fp32")
    kept, moved = sorted(("vision", "text"), key=lambda name: (small / f"{name}.onnx").stat().st_size)
    monkeypatch.setattr(onnx_export, "WEIGHTS_APART_BYTES", (small / f"{kept}.onnx").stat().st_size)
    out = export_model(str(tiny_clip_dir), tmp_path / "apart", progress=False)
    components = manifest(out)["components"]
    assert components[moved]["external_data"]["sha256"] == sha256_file(out / f"{moved}.onnx.data")
    assert "external_data" not in components[kept] and not (out / f"{kept}.onnx.data").exists()
    assert (out / f"{moved}.onnx").stat().st_size * 3 < (small / f"{moved}.onnx").stat().st_size  # nodes, small tensors
    nodes = [[n.op_type for n in onnx.load(str(folder / f"{moved}.onnx")).graph.node] for folder in (small, out)]
    assert nodes[0] == nodes[1] and components[moved]["parity"]["outputs"]
    sample = load_validation_samples(Artifact.open(out))[moved]["inputs"]
    with mmedge.load(small) as whole, mmedge.load(out) as apart:
        expected, found = whole.runners[moved].infer(sample), apart.runners[moved].infer(sample)
    for name, value in expected.items():
        np.testing.assert_array_equal(found[name], value)


def test_fidelity_is_measured_on_the_images_asked_for(clip_artifacts, tiny_clip_dir, tmp_path):
    """--fidelity-images DIR measures a quantized export on the user's own kind of images (the calibration folder
    by default for static INT8, else the bundled held-out photos) and the manifest says which."""
    from mmedge.demo import images

    default = manifest(clip_artifacts("int8-dynamic"))["components"]["vision"]["parity"]["fidelity"]
    assert default["images"] == "bundled held-out photos (8)" and default["held_out_images"] == 32  # 4 views each
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    for path in images(3):
        (scenes / path.name).write_bytes(path.read_bytes())
    own = export_model(str(tiny_clip_dir), tmp_path / "own", precision="int8", fidelity=str(scenes), progress=False)
    fidelity = manifest(own)["components"]["vision"]["parity"]["fidelity"]
    assert fidelity["images"] == "scenes/ (3 images)" and fidelity["held_out_images"] == 12
    assert default["held_out"] is True and fidelity["held_out"] is True
    from mmedge.export.calibration import fidelity_on_calibration, fidelity_paths
    from mmedge.export.pipeline import ExportOptions

    # what the static export measures on (the same path): the images it calibrated on, which the manifest says
    static = ExportOptions(precision="int8", quantization="static", calibration=str(scenes))
    assert fidelity_paths(static)[1] == "scenes/ (3 images): the --calibration images, not held out"
    assert fidelity_on_calibration(static) and fidelity_on_calibration(replace(static, fidelity=str(scenes)))
    assert not fidelity_on_calibration(replace(static, fidelity=str(tmp_path)))
