"""The engine's configuration errors that name a layer (raised at discovery or at the first forward pass)."""


class UnsupportedLayerError(ValueError):
    """A layer that K-FAC cannot precondition exactly; the message names the layer and the fix."""
