"""`mmedge triton`'s integer options against what Triton's schema holds, and an option that could never apply:
refused by ``write_repository`` (shared by the CLI and the Python API) before anything is written; the largest
values accepted are parsed back with tritonclient's ``model_config_pb2``."""

import pytest

from mmedge.errors import InputError
from mmedge.triton import Options, write_repository
from tests.support.battery import api_error, cli_error

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                                       reason='needs tritonclient: pip install "mmedge[triton]"')
from google.protobuf import text_format  # noqa: E402  (tritonclient's dependency)

INT32_MAX = 2 ** 31 - 1
UINT64_MAX = 2 ** 64 - 1


@pytest.fixture(scope="module")
def clip(clip_artifacts, tmp_path_factory):
    link = tmp_path_factory.mktemp("triton-options") / "clip"
    link.symlink_to(clip_artifacts("fp32"), target_is_directory=True)
    return link


def parse(folder):
    return text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


@pytest.mark.parametrize("field, too_big, most", [
    ("max_batch_size", 100_000_000_000, INT32_MAX), ("instances", 5_000_000_000, INT32_MAX),
    ("pipeline_instances", INT32_MAX + 1, INT32_MAX), ("queue_delay_us", 99999999999999999999, UINT64_MAX),
])
def test_counts_past_tritons_fields_are_refused_with_the_range(clip, tmp_path, capsys, field, too_big, most):
    api_error(lambda: write_repository([clip], tmp_path / "repo", Options(**{field: too_big})), InputError,
              f"{field} is {too_big}", f"an integer from {0 if field == 'queue_delay_us' else 1} to {most}")
    flag = "--" + field.replace("_", "-")
    cli_error(capsys, ["triton", clip, "--out", tmp_path / "repo", flag, too_big], InputError, f"to {most}")
    assert not (tmp_path / "repo").exists()


def test_the_largest_values_accepted_are_ones_triton_parses(clip, tmp_path):
    repo = tmp_path / "repo"
    write_repository([clip], repo, Options(max_batch_size=INT32_MAX, queue_delay_us=UINT64_MAX, instances=INT32_MAX,
                                           pipeline_instances=INT32_MAX))
    vision, pipeline = parse(repo / "clip__vision"), parse(repo / "clip-zero-shot")
    assert vision.max_batch_size == INT32_MAX and vision.instance_group[0].count == INT32_MAX
    assert vision.dynamic_batching.max_queue_delay_microseconds == UINT64_MAX
    assert pipeline.instance_group[0].count == INT32_MAX


def test_a_queue_delay_with_batches_of_one_is_refused(clip, tmp_path, capsys):
    """A batch of one is full as soon as its request arrives: the batcher would never wait."""
    api_error(lambda: write_repository([clip], tmp_path / "repo", Options(max_batch_size=1, queue_delay_us=500)),
              InputError, "--queue-delay-us would change nothing with --max-batch-size 1", "raise --max-batch-size")
    cli_error(capsys, ["triton", clip, "--out", tmp_path / "repo", "--max-batch-size", "1", "--queue-delay-us", "5"],
              InputError, "--queue-delay-us would change nothing")
    assert not (tmp_path / "repo").exists()
    write_repository([clip], tmp_path / "repo", Options(max_batch_size=1))  # no delay: batches of one are fine
    write_repository([clip], tmp_path / "repo2", Options(max_batch_size=2, queue_delay_us=500))


def test_max_batch_size_help_says_it_caps_the_decoder_too():
    import argparse

    from mmedge.triton.cli import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    triton = parser._subparsers._group_actions[0].choices["triton"]
    (action,) = [a for a in triton._actions if "--max-batch-size" in a.option_strings]
    assert "decoder" in action.help and "encoder" in action.help
