"""The Lightning face: the ``dpkfac``/``dkfac`` strategy and the callback that runs the engine."""
