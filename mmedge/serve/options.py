"""The server's settings (command line) and the limits every request is held to."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mmedge import backend_option_args
from mmedge.backend_option_args import CliBackendOptions
from mmedge.cli_args import count
from mmedge.errors import InputError

API_KEY_ENV = "MMEDGE_API_KEY"
DEFAULT_MAX_BODY_MB = 32  # a 12 MP phone JPEG is 4-8 MB, a third more as base64
DEFAULT_MAX_IMAGES = 8  # per request
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000  # mmedge's own cap (mmedge.images); an operator may lower it
DEFAULT_MAX_QUEUE = 16  # requests waiting per artifact, beyond those running
DEFAULT_CLIP_WORKERS = 2  # CLIP requests an artifact runs at once without --workers: a second keeps the CPU busy while
# one decodes its images; each holds its decoded images (up to --max-images of --max-image-pixels: ~0.5 GB worst case
# with the defaults), so more would mostly multiply memory (a captioner's default is 1: each is a loaded copy)
MAX_PROMPT_CHARS = 16_000  # refused before tokenizing
MAX_PROMPT_TOKENS = 512  # prompt tokens a captioner takes (mmedge.pipelines.captioner cuts longer prompts)
MAX_EMBEDDING_INPUTS = 256  # texts + images per embeddings request
KEEP_ALIVE_SECONDS = 75  # idle connections stay open longer than clients keep them (httpx: 5 s), so no request
# races a server-side close (nginx's default)
DRAIN_SECONDS = 60  # SIGTERM: how long in-flight requests may take to finish before the process exits anyway
# (--drain-seconds: below an orchestrator's own grace period, e.g. Kubernetes' 30 s, its SIGKILL comes after it)
MAX_DRAIN_SECONDS = 24 * 3600


@dataclass(frozen=True)
class ServeOptions:
    artifacts: tuple[Path, ...]
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    backend: str = "auto"
    device: str = "auto"
    threads: int | None = None
    workers: int | None = None  # requests each artifact runs at once; None: 1 captioner, or DEFAULT_CLIP_WORKERS
    max_queue: int = DEFAULT_MAX_QUEUE
    drain_seconds: float = DRAIN_SECONDS
    allow_images_from: Path | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_MB << 20
    max_images: int = DEFAULT_MAX_IMAGES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    quiet: bool = False  # no loading lines on stderr
    backend_options: CliBackendOptions | None = None  # --backend-option settings (each artifact gets those its plan
    # uses: mmedge.serve.models)

    @classmethod
    def from_args(cls, args) -> "ServeOptions":
        workers = 1 if args.workers is None else args.workers  # None: each kind's default (models.py)
        for name, value, low in (("--port", args.port, 0), ("--workers", workers, 1),
                                 ("--max-queue", args.max_queue, 0), ("--max-body-mb", args.max_body_mb, 1),
                                 ("--max-images", args.max_images, 1),
                                 ("--max-image-pixels", args.max_image_pixels, 1)):
            if value < low or (name == "--port" and value > 65535):
                bound = "from 0 (any free port) to 65535" if name == "--port" else f"at least {low}"
                fix = "pass e.g. --port 8000, or --port 0 for any free port" if name == "--port" else \
                    f"pass e.g. {name} {max(low, 1)}"
                raise InputError(f"{name} is {value}", f"an integer {bound}", fix)
        if not 0 <= args.drain_seconds <= MAX_DRAIN_SECONDS:  # also NaN
            raise InputError(f"--drain-seconds is {args.drain_seconds}",
                             f"seconds from 0 (cut requests off at once) to {MAX_DRAIN_SECONDS} (a day)",
                             f"pass e.g. --drain-seconds 25 (below a 30 s grace period), or leave it out for "
                             f"{DRAIN_SECONDS}")
        allowed = None
        if args.allow_images_from:
            allowed = Path(args.allow_images_from).expanduser().resolve()
            if not allowed.is_dir():
                raise InputError(f"--allow-images-from '{args.allow_images_from}' is not a folder",
                                 "a folder whose images requests may name by path", "check the path")
        api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
        if api_key is not None and not api_key.strip():
            raise InputError("--api-key is empty", "a non-empty key", f"pass --api-key KEY or set {API_KEY_ENV}")
        return cls(artifacts=tuple(Path(a) for a in args.artifacts), host=args.host, port=args.port, api_key=api_key,
                   backend=args.backend, device=args.device, threads=args.threads, workers=args.workers,
                   max_queue=args.max_queue, drain_seconds=args.drain_seconds, allow_images_from=allowed,
                   max_body_bytes=args.max_body_mb << 20,
                   max_images=args.max_images, max_image_pixels=args.max_image_pixels,
                   backend_options=CliBackendOptions.from_args(args) or None, quiet=args.quiet)


def add_arguments(parser) -> None:
    from mmedge.runtimes.registry import backend_names

    parser.add_argument("artifacts", nargs="+", metavar="ARTIFACT",
                        help="artifact folders; each is served under its folder name as the model id")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only; "
                                                            "0.0.0.0 for the network, with --api-key)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port; the chosen one is printed)")
    parser.add_argument("--api-key", default=None,
                        help=f"require 'Authorization: Bearer KEY' on every endpoint but /health "
                                                        f"(default: ${API_KEY_ENV} if set)")
    parser.add_argument("--backend", default="auto", choices=backend_names(), help="as mmedge.load takes it")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=count, default=None, help="CPU threads per graph")
    parser.add_argument(backend_option_args.FLAG, action="append", metavar=backend_option_args.METAVAR,
                        help=backend_option_args.HELP + "; each artifact gets the settings its plan uses")
    parser.add_argument("--workers", type=int, default=None,  # None: each kind's default
                        help="requests each artifact runs at once: captioners loaded per BLIP-2 / IDEFICS artifact "
                        f"(default 1), concurrent calls of a CLIP artifact (default {DEFAULT_CLIP_WORKERS})")
    parser.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                        help="requests that may wait per artifact beyond those running; more get 503 with "
                        f"Retry-After (default {DEFAULT_MAX_QUEUE})")
    parser.add_argument("--drain-seconds", type=float, default=DRAIN_SECONDS, metavar="SECONDS",
                        help="at SIGTERM or one Ctrl-C, how long requests in flight and queued may take to finish; "
                        "those still unanswered then get 503 shutting_down (default "
                        f"{DRAIN_SECONDS}; keep it below an orchestrator's grace period, e.g. 25 under Kubernetes' 30)")
    parser.add_argument("--allow-images-from", metavar="DIR",
                        help="let requests name image files inside DIR (file:// URLs or paths); default: "
                        "data URIs only")
    parser.add_argument("--max-body-mb", type=int, default=DEFAULT_MAX_BODY_MB,
                        help=f"largest request body in MiB; larger ones get 413 (default {DEFAULT_MAX_BODY_MB})")
    parser.add_argument("--max-images", type=int, default=DEFAULT_MAX_IMAGES,
                        help=f"images per request (default {DEFAULT_MAX_IMAGES})")
    parser.add_argument("--quiet", action="store_true", help="no lines on stderr while the artifacts load")
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                        help="pixels per image, read from its header before decoding (default 64,000,000)")
