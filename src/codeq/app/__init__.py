"""The application built on the library: the experiment YAML (``config``), runs with their directories, checkpoints
and W&B (``trainer``, ``checkpoint``, ``tracking``), and the ``codeq`` command (``cli``: ``train``, ``evaluate``,
``report``, ``export``, ``sweep``). Nothing in the library imports from here."""
