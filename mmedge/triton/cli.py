"""``mmedge triton``: write a Triton model repository from artifacts (the subcommand's parser and handler)."""

from __future__ import annotations

import json

from mmedge.cli_args import count, non_negative
from mmedge.idle_options import Rule, refuse_idle


def add_parser(sub) -> None:
    triton = sub.add_parser("triton", help="write a Triton Inference Server model repository from artifacts")
    triton.add_argument("artifacts", nargs="+", metavar="ARTIFACT",
                        help="artifact folders (each folder's name prefixes its models)")
    triton.add_argument("--out", required=True, metavar="REPO",
                        help="the repository folder to write (must not exist unless --overwrite)")
    triton.add_argument("--platform", default="onnxruntime", choices=["onnxruntime", "python"],
                        help="components on Triton's ONNX Runtime backend, or as Python-backend models "
                        "running mmedge's "
                             "own ONNX Runtime runner (for Triton builds without the ONNX Runtime backend)")
    triton.add_argument("--gpu", action="store_true",
                        help="component instances on the GPU (and a zero-shot pipeline running its graphs inline); "
                        "onnxruntime platform: the TensorRT accelerator (FP16, INT8 for static QDQ, FP32 for graphs "
                        "mmedge's TensorRT path keeps at FP32)")
    triton.add_argument("--max-batch-size", type=count, default=8,
                        help="the most rows one call of a model takes: Triton merges requests into one encoder (and "
                        "zero-shot pipeline) call up to it, and it caps the decoder's calls too (larger batches are "
                        "split)")
    triton.add_argument("--queue-delay-us", type=non_negative, default=0,
                        help="how long the dynamic batcher waits for more requests (0: batches form from what "
                        "queued meanwhile; needs --max-batch-size 2 or more)")
    triton.add_argument("--instances", type=count, default=1,
                        help="instances per component model (default 1); a zero-shot pipeline running its graphs "
                        "inline (--zero-shot-graphs) runs them in its own instances, set by --pipeline-instances")
    triton.add_argument("--workers", type=count, default=None,
                        help="requests one embed or caption pipeline instance works on at once (threads; 1: "
                        "each request in "
                             "execute itself); the zero-shot pipeline answers each batch in execute")
    triton.add_argument("--pipeline-instances", type=count, default=1, help="instances (processes) per pipeline model")
    triton.add_argument("--threads", type=count, default=None, help="ONNX Runtime intra-op threads per component")
    triton.add_argument("--spin", action="store_true",
                        help="--platform python: ONNX Runtime's threads go on spinning after each call, as "
                        "mmedge.load's do (for a server with its cores to itself; default: they spin within a call "
                        "and stop when it returns)")
    triton.add_argument("--zero-shot-graphs", default=None, choices=["auto", "inline", "bls"],
                        help="where the zero-shot pipeline runs its graphs: inline (in its own process, one "
                        "Python-backend "
                             "hop per request), bls (the component models); auto: inline for --platform python")
    triton.add_argument("--overwrite", action="store_true", help="replace REPO once the new one is complete")
    triton.add_argument("--json", action="store_true", help="the models written, as JSON")
    triton.add_argument("--quiet", action="store_true", help="no progress lines")
    triton.set_defaults(func=main)


def main(args) -> int:
    from mmedge.triton import Options, write_repository

    refuse_idle(RULES, args, _pipeline_kinds(args.artifacts), "for these artifacts")
    defaults = Options()
    options = Options(platform=args.platform, gpu=args.gpu, max_batch_size=args.max_batch_size,
                      queue_delay_us=args.queue_delay_us, instances=args.instances,
                      workers=defaults.workers if args.workers is None else args.workers,
                      pipeline_instances=args.pipeline_instances, threads=args.threads,
                      zero_shot_graphs=args.zero_shot_graphs or defaults.zero_shot_graphs, spin=args.spin)
    written = write_repository(args.artifacts, args.out, options, overwrite=args.overwrite,
                               progress=not args.quiet)
    if args.json:
        print(json.dumps(written, indent=2))
        return 0
    print(f"wrote {args.out} ({args.platform} platform{', GPU' if args.gpu else ''})")
    for artifact, models in written.items():
        print(f"  {artifact}: {', '.join(models)}")
    print(f"serve it: tritonserver --model-repository {args.out}  (the server's Python needs `pip install mmedge`)")
    return 0


RULES = (  # each shapes one kind of pipeline model (mmedge.triton.protocol.TASK_PIPELINES)
    Rule("--workers", lambda a: a.workers is not None, lambda a, kinds: bool(kinds & {"embed", "caption"}),
         "an embedding or captioning artifact among them (the zero-shot pipeline answers each batch inside execute)",
         "drop --workers"),
    Rule("--zero-shot-graphs", lambda a: a.zero_shot_graphs is not None, lambda a, kinds: "zero-shot" in kinds,
         "a zero-shot CLIP artifact among them", "drop --zero-shot-graphs"),
)


def _pipeline_kinds(paths: list[str]) -> set[str]:
    """The kinds of pipeline model the artifacts get (read from their manifests; no graph is read)."""
    from mmedge.artifact import Artifact
    from mmedge.triton.protocol import TASK_PIPELINES

    return {TASK_PIPELINES[task] for path in paths for task in Artifact.open(path).manifest["tasks"]}


def connect_for_run(args):
    """The remote pipeline ``mmedge run --triton URL MODEL`` talks to, in place of ``mmedge.load(MODEL)``."""
    from mmedge.triton_client import connect

    return connect(args.triton, args.artifact, task=args.task)
