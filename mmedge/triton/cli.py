"""``mmedge triton``: write a Triton model repository from artifacts (the subcommand's parser and handler)."""

from __future__ import annotations

import json


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
                        help="instances on the GPU; onnxruntime platform: the TensorRT accelerator (FP16, INT8 "
                        "for static QDQ)")
    triton.add_argument("--max-batch-size", type=int, default=8, help="rows Triton merges into one encoder call")
    triton.add_argument("--queue-delay-us", type=int, default=0,
                        help="how long the dynamic batcher waits for more requests (0: batches form from what "
                        "queued meanwhile)")
    triton.add_argument("--instances", type=int, default=1, help="instances per component model")
    triton.add_argument("--workers", type=int, default=8,
                        help="requests one embed or caption pipeline instance works on at once (threads; 1: "
                        "each request in "
                             "execute itself); the zero-shot pipeline answers each batch in execute")
    triton.add_argument("--pipeline-instances", type=int, default=1, help="instances (processes) per pipeline model")
    triton.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads per component")
    triton.add_argument("--spin", action="store_true",
                        help="--platform python: ONNX Runtime's threads go on spinning after each call, as "
                        "mmedge.load's do (for a server with its cores to itself; default: they spin within a call "
                        "and stop when it returns)")
    triton.add_argument("--zero-shot-graphs", default="auto", choices=["auto", "inline", "bls"],
                        help="where the zero-shot pipeline runs its graphs: inline (in its own process, one "
                        "Python-backend "
                             "hop per request), bls (the component models); auto: inline for --platform python")
    triton.add_argument("--overwrite", action="store_true", help="replace REPO once the new one is complete")
    triton.add_argument("--json", action="store_true", help="the models written, as JSON")
    triton.add_argument("--quiet", action="store_true", help="no progress lines")
    triton.set_defaults(func=main)


def main(args) -> int:
    from mmedge.triton import Options, write_repository

    options = Options(platform=args.platform, gpu=args.gpu, max_batch_size=args.max_batch_size,
                      queue_delay_us=args.queue_delay_us, instances=args.instances, workers=args.workers,
                      pipeline_instances=args.pipeline_instances, threads=args.threads,
                      zero_shot_graphs=args.zero_shot_graphs, spin=args.spin)
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


def connect_for_run(args):
    """The remote pipeline ``mmedge run --triton URL MODEL`` talks to, in place of ``mmedge.load(MODEL)``."""
    from mmedge.triton_client import connect

    return connect(args.triton, args.artifact, task=args.task)
