"""RSS and glibc heap (mallinfo2, MB) every 7 hooked layers during exact initialisation of the scale suite's
0.5B Llama (the first argument picks giva.initialize(mode="exact") or the pre-package code; the second the
number of layers, 24 for the suite's model).

    OMP_NUM_THREADS=1 python scripts/scale_heap_trace.py exact 24
    OMP_NUM_THREADS=1 python scripts/scale_heap_trace.py legacy 24

Memory only (the times it prints were taken at nice 19 on a loaded machine and mean nothing).
"""

import ctypes
import sys
import time

import torch

from giva.bench import scale

FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in FIELDS]


libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2


def heap() -> dict[str, int]:
    info = libc.mallinfo2()
    return {"arena": info.arena // 10**6, "hblkhd": info.hblkhd // 10**6, "used": info.uordblks // 10**6,
            "free": info.fordblks // 10**6}


def main(kind: str, layers: int) -> None:
    spec = scale.ScaleModel("diag", "float32", 2, 1, 32, 1800, 1280, 3456, layers, 20, 4)
    torch.manual_seed(0)
    base = scale.build_base(spec)
    model = scale._giva_model(base)
    data = scale.batches(spec, base.config.vocab_size)
    trace, calls = [], [0]

    def sample(tag: str) -> None:
        trace.append((tag, scale._rss_bytes("VmRSS") / 1e9, scale._rss_bytes("VmHWM") / 1e9, heap()))

    def spy(original):
        def wrapped(*args):
            original(*args)
            calls[0] += 1
            if calls[0] % 7 == 0:
                sample(f"call{calls[0]}")
        return wrapped

    if kind == "exact":
        from giva import initialize

        sums = sys.modules["giva.init.accumulate"]._Sums
        sums.__call__ = spy(sums.__call__)

        def run():
            return initialize(model, data, num_batches=len(data), progress=False, mode="exact")
    else:
        legacy = scale._legacy_initialize()
        recorder = sys.modules["giva._legacy_gradients"]._GradientRecorder
        recorder.accumulate = spy(recorder.accumulate)

        def run():
            return legacy(model, data, num_batches=len(data), progress=False)

    scale._reset_peak()
    sample("start")
    start = time.perf_counter()
    report = run()
    elapsed = time.perf_counter() - start
    sample("end")
    print(kind, "seconds", round(elapsed, 2), "grad", round(report.gradient_seconds, 2), "svd",
          round(report.svd_seconds, 2), "peak", scale._rss_bytes("VmHWM") / 1e9)
    for tag, rss, hwm, stats in trace:
        print(tag, f"rss {rss:.3f} hwm {hwm:.3f}", stats)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
