"""The export formats, without torch: the command line checks ``--format`` before loading any model."""

#: what ``featcache export --format`` writes (the first is the default); see :mod:`featcache.export.build`
FORMATS = ("torchscript", "pt2", "onnx", "safetensors")
