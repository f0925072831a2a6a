"""``python -m lightning_dpkfac.bench``: the benchmark (:mod:`lightning_dpkfac.tools.bench`)."""

from lightning_dpkfac.tools.bench import main

if __name__ == "__main__":
    main()
