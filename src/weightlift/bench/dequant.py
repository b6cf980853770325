"""Dequantization throughput per GGML type: weightlift's torch kernels vs gguf-py's numpy.

    python -m weightlift.bench.dequant --mib 64 --repeat 3

Random valid blocks (finite scales) of each type, dequantized to float32 and bfloat16 on the CPU
(or ``--device cuda``); reports packed GB per CPU-second (bytes of blocks in, per second of this
process's CPU time, so other load on the machine does not skew it) and the speed-up over
``gguf.quants.dequantize`` (float32 output; needs the ``gguf`` package). A microbenchmark, not a
test: numbers depend on the machine and on other load.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..dequant import KERNELS, dequantize
from ..formats.ggml import GGML_TYPES_BY_NAME

#: Byte offsets of each type's float16 scale fields; random bytes there could be NaN or inf.
F16_FIELDS = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
    "IQ4_NL": (0,), "IQ4_XS": (0,),
}


def random_blocks(name: str, n_blocks: int, seed: int = 0) -> np.ndarray:
    """``n_blocks`` valid blocks of GGML type ``name`` as ``(n_blocks, type_size)`` uint8: random
    bytes with finite random float16 scales (some negative); plain types hold finite floats."""
    kind = GGML_TYPES_BY_NAME[name]
    rng = np.random.default_rng(seed)
    if not kind.quantized:
        values = torch.from_numpy(rng.standard_normal(n_blocks).astype(np.float32))
        return values.to(kind.torch).view(torch.uint8).numpy().reshape(n_blocks, kind.type_size)
    blocks = rng.integers(0, 256, size=(n_blocks, kind.type_size), dtype=np.uint8)
    for offset in F16_FIELDS.get(name, ()):
        scale = (rng.standard_normal(n_blocks) * 0.05).astype(np.float16)
        scale[::7] = -scale[::7]
        blocks[:, offset:offset + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    if name == "MXFP4":  # E8M0 exponents: 0 and 1 (subnormal scales) up to 2^72, no overflow
        blocks[:, 0] = rng.integers(0, 200, size=n_blocks, dtype=np.uint8)
        blocks[:2, 0] = (0, 1)[:n_blocks]
    return blocks


def best_seconds(run: Callable[[], object], repeat: int) -> float:
    """Best CPU time (this process, all threads) of ``repeat`` runs: robust to a busy machine."""
    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        run()
        best = min(best, time.process_time() - started)
    return best


def measure(names: Sequence[str], nbytes: int, repeat: int, device: str,
            on_row: Callable[[dict[str, object]], None] | None = None) -> list[dict[str, object]]:
    """One row per type: packed GB per CPU-second for float32 and bfloat16 output, and numpy's."""
    try:
        from gguf import GGMLQuantizationType, quants
    except ImportError:
        quants = None
    rows = []
    for name in names:
        blocks = random_blocks(name, max(1, nbytes // GGML_TYPES_BY_NAME[name].type_size))
        packed = torch.from_numpy(blocks).to(device)
        row: dict[str, object] = {"type": name, "MB": blocks.nbytes / 1e6}
        for label, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16)):
            def run(dtype: torch.dtype = dtype) -> None:
                dequantize(packed, name, dtype)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
            run()  # warm up (tables, allocator)
            row[f"torch {label} GB/s"] = blocks.nbytes / best_seconds(run, repeat) / 1e9
        if quants is not None and name != "F32":
            qtype = GGMLQuantizationType[name]
            seconds = best_seconds(lambda: quants.dequantize(blocks, qtype), repeat)
            row["numpy f32 GB/s"] = blocks.nbytes / seconds / 1e9
            row["speed-up"] = row["torch f32 GB/s"] / row["numpy f32 GB/s"]  # type: ignore[operator]
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=32, help="packed MiB per type (default 32)")
    parser.add_argument("--repeat", type=int, default=3, help="best of N runs (default 3)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's own choice)")
    parser.add_argument("--types", nargs="*", default=[n for n in KERNELS if n != "F32"])
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    columns = ["type", "MB", "torch f32 GB/s", "torch bf16 GB/s", "numpy f32 GB/s", "speed-up"]
    print(" | ".join(columns), flush=True)
    measure(args.types, args.mib << 20, args.repeat, args.device, on_row=lambda row: print(
        " | ".join(f"{row[c]:.2f}" if isinstance(row.get(c), float) else str(row.get(c, "-"))
                   for c in columns), flush=True))


if __name__ == "__main__":
    main()
