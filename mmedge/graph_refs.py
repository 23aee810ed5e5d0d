"""The files an ONNX graph reads its weights from (its tensors' external data ``location``s), read from the protobuf
wire format without the ``onnx`` package (the device room does not need it) and without loading any weight.

A graph names its own external data files, and ONNX Runtime before 1.24 opened whatever they named: an absolute
path, ``../``, a symlink out of the folder (a graph that returns such an initializer as an output put
/etc/passwd into a CLIP embedding). A file inside the folder that the manifest does not name was read unhashed on
every release. ``mmedge.artifact`` checks each graph's locations against the one weight file its manifest entry names
and hashes (``external_locations``).

The walk follows only the fields that hold tensors: ModelProto.graph (7) and functions (25) -> FunctionProto.node
(7); GraphProto.initializer (5),
sparse_initializer (15) and node (1) -> NodeProto.attribute (5) -> AttributeProto.t (5), g (6), tensors (10), graphs
(11), sparse_tensor (22), sparse_tensors (23) -> SparseTensorProto.values (1), indices (2) -> TensorProto.external_data
(13) -> StringStringEntryProto key (1) / value (2). Every other field is skipped by its length.
"""

from __future__ import annotations

import mmap
from pathlib import Path

_MODEL_GRAPH = 7
_MODEL_FUNCTIONS = 25  # model-local functions (FunctionProto): ONNX Runtime inlines them, Constants and all
_FUNCTION_NODE = 7
_GRAPH = {5: "tensor", 15: "sparse", 1: "node"}
_NODE_ATTRIBUTE = 5
_ATTRIBUTE = {5: "tensor", 10: "tensor", 6: "graph", 11: "graph", 22: "sparse", 23: "sparse"}
_SPARSE = {1: "tensor", 2: "tensor"}
_TENSOR_EXTERNAL_DATA = 13


class MalformedGraph(ValueError):
    """The bytes are not an ONNX protobuf this walk can read."""


def external_locations(path: str | Path) -> set[str]:
    """The ``location`` of every external-data tensor the graph at ``path`` names (empty: its weights are inside)."""
    with open(path, "rb") as handle:
        if handle.seek(0, 2) == 0:
            raise MalformedGraph("an empty file")
        try:
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):  # a file system that cannot map it: read whole
            handle.seek(0)
            return _locations(memoryview(handle.read()))
        with mapped:
            view = memoryview(mapped)
            try:
                return _locations(view)
            finally:
                view.release()


def _locations(view) -> set[str]:
    found: set[str] = set()
    for field, start, end in _fields(view, 0, len(view)):
        if field == _MODEL_GRAPH:
            _graph(view, start, end, found, 0)
        elif field == _MODEL_FUNCTIONS:
            _nodes(view, start, end, _FUNCTION_NODE, found, 0)
    return found


def _graph(view, start: int, end: int, found: set[str], depth: int) -> None:
    if depth > 64:  # subgraphs inside subgraphs: a real model nests a few
        raise MalformedGraph("graphs nested more than 64 deep")
    for field, begin, stop in _fields(view, start, end):
        kind = _GRAPH.get(field)
        if kind == "tensor":
            _tensor(view, begin, stop, found)
        elif kind == "sparse":
            _sparse(view, begin, stop, found)
        elif kind == "node":
            _node(view, begin, stop, found, depth)


def _nodes(view, start: int, end: int, node_field: int, found: set[str], depth: int) -> None:
    for field, begin, stop in _fields(view, start, end):
        if field == node_field:
            _node(view, begin, stop, found, depth)


def _node(view, start: int, end: int, found: set[str], depth: int) -> None:
    for field, begin, stop in _fields(view, start, end):
        if field == _NODE_ATTRIBUTE:
            _attribute(view, begin, stop, found, depth)


def _attribute(view, start: int, end: int, found: set[str], depth: int) -> None:
    for field, begin, stop in _fields(view, start, end):
        kind = _ATTRIBUTE.get(field)
        if kind == "tensor":
            _tensor(view, begin, stop, found)
        elif kind == "graph":
            _graph(view, begin, stop, found, depth + 1)
        elif kind == "sparse":
            _sparse(view, begin, stop, found)


def _sparse(view, start: int, end: int, found: set[str]) -> None:
    for field, begin, stop in _fields(view, start, end):
        if field in _SPARSE:
            _tensor(view, begin, stop, found)


def _tensor(view, start: int, end: int, found: set[str]) -> None:
    for field, begin, stop in _fields(view, start, end):
        if field == _TENSOR_EXTERNAL_DATA:
            entry = {key: bytes(view[b:s]) for key, b, s in _fields(view, begin, stop)}
            if entry.get(1) == b"location" and 2 in entry:
                found.add(entry[2].decode("utf-8", "replace"))


def _fields(view, start: int, end: int):
    """(field number, start, end) of each length-delimited field in ``view[start:end]``; other wire types skipped."""
    position = start
    while position < end:
        field, wire, begin, stop, position = _field(view, position, end)
        if wire == 2:
            yield field, begin, stop
        elif wire == 4:
            raise MalformedGraph(f"the end of group {field} outside one, at byte {begin}")
    if position != end:
        raise MalformedGraph("a field runs past its message")


def _skip_group(view, position: int, end: int, group: int) -> int:
    """The position after the end tag of the group ``group`` whose fields start at ``position`` (groups nest)."""
    while position < end:
        field, wire, _, _, position = _field(view, position, end)
        if wire == 4:
            if field != group:
                raise MalformedGraph(f"group {group} ended by the end of group {field}")
            return position
    raise MalformedGraph(f"group {group} has no end")


def _field(view, position: int, end: int) -> tuple[int, int, int, int, int]:
    """(field number, wire type, start, end, next position) of the field at ``position``: start..end are its bytes
    for a length-delimited field; a group (protobuf 2's: no ONNX field is one, but a parser skips an unknown one
    whole) is skipped to its end tag."""
    key, position = _varint(view, position, end)
    field, wire = key >> 3, key & 7
    begin = position
    if wire == 0:
        _, position = _varint(view, position, end)
    elif wire == 1:
        position += 8
    elif wire == 5:
        position += 4
    elif wire == 2:
        length, begin = _varint(view, position, end)
        position = begin + length
        if position > end:
            raise MalformedGraph(f"a field of {length} bytes runs past its message")
    elif wire == 3:
        position = _skip_group(view, position, end, field)
    elif wire != 4:
        raise MalformedGraph(f"wire type {wire} at byte {position}")
    return field, wire, begin, position, position


def _varint(view, position: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if position >= end or shift > 63:
            raise MalformedGraph(f"a truncated number at byte {position}")
        byte = view[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7


__all__ = ["MalformedGraph", "external_locations"]
