"""A family is the same contract in each room: a ``Family`` on the host, a row of ``mmedge.families`` on the device,
and the two agree on its name, label and tasks; its pipelines are real classes."""

import inspect

import pytest

from mmedge.families import FAMILIES as DEVICE_FAMILIES
from mmedge.families import pipeline_class

pytest.importorskip("torch", reason="the exporter's families need torch (pip install 'mmedge[export]')")

from mmedge.export.families import FAMILIES  # noqa: E402
from mmedge.export.families.base import Family  # noqa: E402


def test_both_rooms_list_the_same_families():
    assert set(FAMILIES) == set(DEVICE_FAMILIES)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_each_family_keeps_the_contract(name):
    family, row = FAMILIES[name], DEVICE_FAMILIES[name]
    assert isinstance(family, Family) and not inspect.isabstract(type(family))
    assert (family.name, family.label, tuple(family.tasks)) == (row.name, row.label, row.tasks)
    assert family.default_task in row.tasks and set(row.pipelines) == set(row.tasks)
    assert (row.generative is not None) == family.has_llm
    for task in row.tasks:
        pipeline = pipeline_class(name, task)
        assert inspect.isclass(pipeline) and callable(getattr(pipeline, "close", None))
    assert list(inspect.signature(family.manifest_extras).parameters) == ["loaded", "options", "written"]
