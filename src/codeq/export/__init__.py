"""Export of a compressed model: integer codes on their grids (``grids``), the bit-packed ``.codeq`` file
(``packed``), ONNX (``onnx``, extra ``onnx``) and slimming of null channels (``slim``). The public entry point is
``codeq.export_onnx``."""
