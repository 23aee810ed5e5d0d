"""A backend plug-in written the way a new one is (``mmedge.runtimes.registry`` says how), for tests/test_backends.py:
"ort-single", ONNX Runtime on one CPU thread with sequential execution. ``auto`` gives it the text encoder only,
ahead of every shipped backend; named explicitly it takes every component. Its runners are real ONNX Runtime
sessions (``OnnxRuntimeRunner``); nothing in mmedge's core knows it exists."""

from __future__ import annotations

from dataclasses import dataclass

from mmedge.backends import Backend, BackendInfo, ComponentPlan, PlanRequest

INFO = BackendInfo("ort-single", "tests.support.single_thread_plugin", "onnxruntime", "pip install onnxruntime",
                   priority=5)


@dataclass
class SingleSettings:
    """What ``backend_options["ort-single"]`` may hold."""

    graph_optimization: str = "all"


class SingleThreadBackend(Backend):
    runner_module = "mmedge.runtimes.onnxruntime"
    settings = SingleSettings

    def unusable(self, request: PlanRequest) -> str | None:
        return None if request.probe.engines.get("onnxruntime") else "onnxruntime is not installed"

    def plan_components(self, request: PlanRequest, taken: dict[str, ComponentPlan]) -> dict[str, ComponentPlan]:
        components = request.manifest["components"]
        names = list(components) if request.explicit else [n for n in ("text",) if n in components]
        request.reasons.append(f"backend ort-single: {', '.join(names) or 'nothing'} on one thread")
        return {n: ComponentPlan(self.name, ("cpu",), components[n]["precision"], {"threads": 1})
                for n in names if n not in taken}

    def open_runner(self, artifact, name: str, plan: ComponentPlan, *, threads: int | None = None,
                    settings: dict | None = None, keep_on_device: bool = False):
        return self.import_runner_module().create_runner(artifact.component_path(name), name, artifact.component(name),
                                                         providers=plan.providers, inter_op_threads=1,
                                                         **plan.options, **(settings or {}))


BACKEND = SingleThreadBackend(INFO)
