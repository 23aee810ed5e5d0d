"""Host-side export tools: checkpoint → validated, quantized ONNX artifact. Needs `mmedge[export]`."""

from mmedge.export.pipeline import ExportOptions, export_model, require_export_tools

__all__ = ["ExportOptions", "export_model", "require_export_tools"]
