"""``python -m lightning_dpkfac.plan``: the planner (:mod:`lightning_dpkfac.tools.plan`)."""

from lightning_dpkfac.tools.plan import main

if __name__ == "__main__":
    main()
