"""Export: ONNX in QDQ form (``export_onnx``), and the copy it is made from."""

from .onnx import export_onnx, prepare_for_export

__all__ = ["export_onnx", "prepare_for_export"]
