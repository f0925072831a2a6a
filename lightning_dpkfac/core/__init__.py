"""The K-FAC engine, usable without Lightning: configuration, layers and their factors, decompositions,
preconditioning, faults and checkpoints (:class:`~lightning_dpkfac.core.preconditioner.KFACPreconditioner`)."""
