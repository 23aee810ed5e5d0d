"""An artifact from someone you do not trust: its manifest's hashes are theirs too, so they prove nothing. What such
an artifact could make mmedge do beyond wrong outputs is refused: a graph reading weights from a file its manifest
does not name (/etc/passwd through ONNX Runtime before 1.24, an unhashed file beside it on every release), an engines/
folder that is a link elsewhere (mmedge wrote and pruned files there), an .npz that inflates to gigabytes, labels
whose escape sequences drive the terminal `mmedge run` prints them to. (The Triton repository's generated Python is
checked in tests/test_triton_repository.py.)"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import mmedge
from mmedge.errors import IntegrityError, UnsafePathError
from mmedge.graph_refs import external_locations


def _copy(source, folder):
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("engines"))
    return folder


def _rehash(folder, entry_of, path) -> None:
    """Record ``path``'s sha256 (and size) where ``entry_of(manifest)`` keeps them, as the artifact's author would."""
    manifest = json.loads((folder / "manifest.json").read_text())
    entry = entry_of(manifest)
    entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    if "size_bytes" in entry:
        entry["size_bytes"] = path.stat().st_size
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _leaking_vision(folder, location: str) -> None:
    """vision.onnx returning the first 64 bytes of ``location`` (an external-data initializer) as its embedding."""
    leak = TensorProto(name="leak", data_type=TensorProto.UINT8, dims=[64], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", "0"), ("length", "64")):
        leak.external_data.add(key=key, value=value)
    nodes = [helper.make_node("Cast", ["leak"], ["as_float"], to=TensorProto.FLOAT),
             helper.make_node("Reshape", ["as_float", "shape"], ["row"]),
             helper.make_node("ReduceMean", ["pixel_values"], ["mean"], keepdims=0),
             helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
             helper.make_node("Add", ["row", "nothing"], ["image_embeds"])]
    graph = helper.make_graph(
        nodes, "leak", [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, 30, 30])],
        [helper.make_tensor_value_info("image_embeds", TensorProto.FLOAT, ["batch", 64])],
        [leak, numpy_helper.from_array(np.array([1, 64], np.int64), "shape"),
         numpy_helper.from_array(np.array(0, np.float32), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / "vision.onnx"
    path.write_bytes(model.SerializeToString())
    _rehash(folder, lambda manifest: manifest["components"]["vision"], path)


@pytest.mark.parametrize("location", ["/etc/passwd", "../secret.bin", "unlisted.bin", "linked.bin"])
def test_a_graph_reading_weights_from_a_file_its_manifest_does_not_name_is_refused(clip_artifacts, tmp_path,
                                                                                   location, photos):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"a secret of this machine, 64 bytes long, that no model may read.")
    folder = _copy(clip_artifacts("fp32"), tmp_path / "artifact")
    shutil.copy(secret, folder / "unlisted.bin")  # beside the graph, but no manifest entry names or hashes it
    (folder / "linked.bin").symlink_to(secret)
    _leaking_vision(folder, location)
    assert external_locations(folder / "vision.onnx") == {location}
    with pytest.raises(UnsafePathError, match=rf"the graph of component 'vision' \('vision.onnx'\) reads weights from "
                                              rf"'{location}', a file its manifest entry does not name and hash"):
        mmedge.load(folder, task="embed").embed_images(photos[:1])


def test_the_weight_file_a_manifest_names_is_read(tmp_path, clip_artifacts):
    """The walk finds an export's own weight file (a graph over 32 MiB stores its weights apart) and takes it."""
    import mmedge.export.onnx_export as onnx_export

    folder = _copy(clip_artifacts("fp32"), tmp_path / "artifact")
    onnx_export.save_weights_apart(onnx.load(str(folder / "vision.onnx")), folder / "vision.onnx")
    assert external_locations(folder / "vision.onnx") == {"vision.onnx.data"}
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["components"]["vision"]["external_data"] = {"file": "vision.onnx.data", "sha256": "0" * 64}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    _rehash(folder, lambda m: m["components"]["vision"]["external_data"], folder / "vision.onnx.data")
    _rehash(folder, lambda m: m["components"]["vision"], folder / "vision.onnx")
    with mmedge.load(folder, task="embed") as embedder:
        assert embedder.runners["vision"]


def test_an_engines_folder_that_is_a_link_is_refused_and_nothing_is_written_there(clip_artifacts, tmp_path):
    victim = tmp_path / "elsewhere"
    victim.mkdir()
    (victim / ".keep.123-abcd1234.tmp").write_text("someone's file")  # named as mmedge names its stale temporaries
    folder = _copy(clip_artifacts("fp32"), tmp_path / "artifact")
    (folder / "engines").symlink_to(victim)
    with pytest.raises(UnsafePathError, match=r"the artifact's engines/ is a symbolic link \(to '.*elsewhere'\).*"
                                              r"fix: delete the link"):
        mmedge.load(folder)
    assert [p.name for p in victim.iterdir()] == [".keep.123-abcd1234.tmp"]


def test_an_npz_that_inflates_past_its_size_is_refused_before_it_is_read(clip_artifacts, tmp_path):
    folder = _copy(clip_artifacts("fp32"), tmp_path / "artifact")
    bomb = folder / "validation.npz"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("vision/inputs/pixel_values.npy", "w", force_zip64=True) as member:
            zeros = bytes(2**20)
            for _ in range(64):  # 64 MiB of zeros in about 64 KiB
                member.write(zeros)
    _rehash(folder, lambda manifest: manifest["validation"], bomb)
    from mmedge.artifact import Artifact
    from mmedge.validate import load_validation_samples

    with pytest.raises(IntegrityError, match=r"validation samples file 'validation.npz' inflates to 67,108,864 bytes "
                                             r"from [\d,]+ \(compressed members: not an export's\)"):
        load_validation_samples(Artifact.open(folder))


def test_labels_with_control_characters_are_refused(clip_artifacts, tmp_path):
    """`mmedge run` prints a fused CLIP's labels: ESC[2J cleared the screen, an OSC sequence retitled the window."""
    folder = _copy(clip_artifacts("fused-fp32"), tmp_path / "artifact")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["zero_shot"]["labels"][0] = "\x1b[2Jcat"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(mmedge.errors.ManifestError, match=r"'zero_shot.labels' holds '\\x1b\[2Jcat', with control "
                                                          r"characters; expected labels of printable text"):
        mmedge.load(folder)
    assert os.path.isdir(folder)


def _external(name: str) -> TensorProto:
    tensor = numpy_helper.from_array(np.zeros(4, np.float32), name)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "stray.bin"), ("offset", "0"), ("length", "16")):
        tensor.external_data.add(key=key, value=value)
    return tensor


def test_the_walk_finds_a_reference_in_a_function_and_past_a_group(tmp_path):
    """ONNX Runtime inlines a model-local function's Constant and reads its file; protobuf skips an unknown group
    whole: the walk had missed the first and given up on the second (so the check let the graph through)."""
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    function = helper.make_function("local", "F", [], ["y"], [helper.make_node("Constant", [], ["y"],
                                                                                value=_external("c"))],
                                    [helper.make_opsetid("", 17)])
    graph = helper.make_graph([helper.make_node("F", [], ["y"], domain="local")], "g", [], [out])
    model = helper.make_model(graph, functions=[function],
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])
    path = tmp_path / "function.onnx"
    onnx.save(model, str(path))
    assert external_locations(path) == {"stray.bin"}
    grouped = tmp_path / "grouped.onnx"
    grouped.write_bytes(path.read_bytes() + bytes([0x9B, 0x06, 0x9C, 0x06]))  # field 99's start and end: a group
    assert onnx.load(str(grouped), load_external_data=False).functions  # protobuf reads it
    assert external_locations(grouped) == {"stray.bin"}
