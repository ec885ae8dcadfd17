"""Deployment exports: ONNX graphs of backbones, trained segmentation models and the phase frame model
(``meddino export onnx``), checked against PyTorch with onnxruntime when written (see docs/deploy.md)."""

from meddino.lazy import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        "ExportForm": ".onnx",
        "OnnxCheckError": ".onnx",
        "bake_input_size": ".onnx",
        "export_onnx": ".onnx",
        "load_form": ".onnx",
        "onnx_session": ".onnx",
        "read_onnx_meta": ".onnx",
    },
)
