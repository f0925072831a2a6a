"""The Hydra face: typed strategy schemas in Hydra's ConfigStore, and multirun jobs run as fresh processes."""
