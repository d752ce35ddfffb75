"""Exporters of SFA models (ONNX) and their runtime plugins."""
