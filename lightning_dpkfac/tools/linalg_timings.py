"""``python -m lightning_dpkfac.tools.linalg_timings``: what one decomposition of a K-FAC factor costs on this
device, against the products and QR steps that reusing the last eigenbasis would run instead.

For each size ``d``, on a symmetric positive-definite ``d x d`` matrix (a damped factor), the median
milliseconds over ``--reps`` runs, each after a warm-up, of:

- ``eigh``: the eigen method's decomposition (``torch.linalg.eigh``);
- ``inverse``: the inverse method's (``cholesky_ex``, then ``cholesky_inverse``);
- ``qr``: one step of orthogonal iteration from the last basis, ``qr(F @ Q)`` (product included);
- ``matmul``: one ``d x d`` product.

The last column is ``eigh / (2 qr + 2 matmul)``: eigenbasis reuse (two orthogonal-iteration steps and a
two-product check, docs/defaults.md) can only pay where it is well above 1. On the 2-core CPU it was below
1 at every size; this measures the same on a GPU (``.ci/gpu-check``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

#: the operations timed, in table order: name -> what runs on a factor ``f`` and a basis ``q``
OPERATIONS: dict[str, Callable[[Tensor, Tensor], object]] = {
    "eigh": lambda f, q: torch.linalg.eigh(f),
    "inverse": lambda f, q: torch.cholesky_inverse(torch.linalg.cholesky_ex(f)[0]),
    "qr": lambda f, q: torch.linalg.qr(f @ q),
    "matmul": lambda f, q: f @ q,
}


def spd_matrix(d: int, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Tensor:
    """A damped ``d x d`` factor: ``X^T X / n + 0.1 I`` of ``n = 2d`` random rows."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * d, d, generator=generator, dtype=torch.float64)
    return (x.T @ x / (2 * d) + 0.1 * torch.eye(d, dtype=torch.float64)).to(device=device, dtype=dtype)


def time_ms(run: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median wall milliseconds of ``run()`` over ``reps`` runs after one warm-up, waiting for the device."""
    def once() -> float:
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) * 1e3

    once()  # library initialisation (cuSOLVER handles, MKL buffers)
    return statistics.median(once() for _ in range(reps))


def measure(sizes: Sequence[int], device: torch.device, dtype: torch.dtype, reps: int) -> list[dict[str, float]]:
    """One row per size: ``d`` and each operation's median milliseconds."""
    rows = []
    for d in sizes:
        f = spd_matrix(d, device, dtype)
        q = torch.linalg.eigh(f)[1]
        rows.append({"d": d, **{name: time_ms(lambda op=op: op(f, q), device, reps) for name, op in OPERATIONS.items()}})
    return rows


def markdown(rows: list[dict[str, float]], device: torch.device, dtype: torch.dtype) -> str:
    """The rows of :func:`measure` as a table, under a line naming the device."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    lines = [f"Decomposition timings, milliseconds (median), {dtype}, {name}, torch {torch.__version__}:", "",
             "| d | " + " | ".join(OPERATIONS) + " | eigh / (2 qr + 2 matmul) |",
             "|---" * (len(OPERATIONS) + 2) + "|"]
    for r in rows:
        ratio = r["eigh"] / (2 * r["qr"] + 2 * r["matmul"])
        lines.append(f"| {r['d']} | " + " | ".join(f"{r[op]:.3f}" for op in OPERATIONS) + f" | {ratio:.2f} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m lightning_dpkfac.tools.linalg_timings``."""
    p = argparse.ArgumentParser(prog="python -m lightning_dpkfac.tools.linalg_timings",
                                description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048], help="factor sizes d")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to run")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="the factors' dtype")
    p.add_argument("--reps", type=int, default=5, help="timed runs per operation and size (>= 1)")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    if args.reps < 1 or min(args.sizes) < 2:
        p.error(f"--reps {args.reps} and --sizes {args.sizes} are invalid: reps >= 1 and every size >= 2")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    print(markdown(measure(args.sizes, device, dtype, args.reps), device, dtype))


if __name__ == "__main__":
    main()
