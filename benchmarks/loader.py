"""Benchmark of the RecordIO loaders and of the index at web scale.

Two questions, one script:

* Throughput: images/s of the DALI CPU pipeline and of the torch loader (DataLoader
  workers over the native reader) at 1 and 2 workers / threads, on a packed set of a
  few thousand synthetic 112x112 JPEGs. One warm-up epoch, then timed epochs; decoding,
  flip, normalize and batch assembly are all inside the timed loop.
* Index: load time and memory of a synthetic ``.idx`` with 42 M entries (WebFace42M's
  size): the first parse from text, and later loads from the memory-mapped ``.npy``
  cache. Each measurement runs in its own subprocess (so one case's allocations cannot
  hide in another's) with the harness's ``PeakMemory``, plus the private (``RssAnon``)
  memory left afterwards: the mapped cache's pages are page cache, not the loader's.

CPU run that produced results/loader.md (``--workdir`` keeps the 860 MB synthetic index
and the packed set between runs):
    python benchmarks/loader.py --images 3000 --identities 300 --batch 128 \
        --workers 1 2 --idx-entries 42000000 --workdir /tmp/pfc-loader-bench \
        --out benchmarks/results/loader.md
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


import harness  # noqa: E402


def make_face_folder(root: str, images: int, identities: int, seed: int = 0) -> None:
    """Smooth random 112x112 JPEGs spread over identity folders."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for index in range(images):
        folder = os.path.join(root, "id_%05d" % (index % identities))
        os.makedirs(folder, exist_ok=True)
        small = rng.integers(0, 256, (14, 14, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((112, 112), Image.BICUBIC)
        image.save(os.path.join(folder, "%06d.jpg" % index), quality=90)


def loader_throughput(prefix: str, loader: str, workers: int, batch: int, epochs: int) -> dict:
    from partialfc.data.recordio_source import build_recordio_source

    source = build_recordio_source(prefix, batch, 0, 1, 0, workers, loader, False, None, "cpu")
    for _ in source.epoch(0):  # warm-up: worker start, page cache, DALI build
        pass
    images = 0
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        for batch_images, _ in source.epoch(epoch):
            images += batch_images.shape[0]
    seconds = time.perf_counter() - start
    source.close()
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds}


def write_synthetic_idx(path: str, entries: int, seed: int = 0) -> None:
    """``key\\toffset`` lines with record sizes drawn like aligned face JPEGs (~8-12 KB)."""
    rng = np.random.default_rng(seed)
    chunk = 1_000_000
    offset = 0
    with open(path, "w") as handle:
        for start in range(0, entries, chunk):
            count = min(chunk, entries - start)
            sizes = (rng.integers(8_000, 12_000, count) + 3) // 4 * 4 + 8
            offsets = offset + np.concatenate([[0], np.cumsum(sizes)[:-1]])
            offset = int(offsets[-1] + sizes[-1])
            keys = np.arange(start, start + count)
            handle.write("\n".join(map("%d\t%d".__mod__, zip(keys.tolist(), offsets.tolist()))))
            handle.write("\n")


def index_case(idx_path: str, case: str) -> dict:
    """Runs inside a child process: time and memory of one way to load the index."""
    from partialfc.data.recordio_index import load_index

    import torch

    meter = harness.PeakMemory(torch.device("cpu"))
    baseline = meter.set_baseline()
    anon_baseline = harness._proc_status_bytes("RssAnon")
    with meter.phase() as peak:
        start = time.perf_counter()
        if case in ("parse", "build_cache", "cached"):
            keys, offsets = load_index(idx_path, use_cache=case != "parse")
        elif case == "loadtxt_1m":
            table = np.loadtxt(idx_path, dtype=np.int64, delimiter="\t", max_rows=1_000_000)
            keys, offsets = table[:, 0], table[:, 1]
        else:
            raise ValueError(case)
        seconds = time.perf_counter() - start
    rng = np.random.default_rng(1)
    probes = rng.integers(0, keys.shape[0], 1_000_000)
    start = time.perf_counter()
    checksum = int(np.asarray(offsets[probes]).sum())
    lookup = time.perf_counter() - start
    mib = 1 << 20
    return {"case": case, "entries": int(keys.shape[0]), "seconds": seconds,
            "peak_extra_mb": peak["bytes"] / mib, "memory_method": meter.method,
            "resident_extra_mb": (harness.current_rss_bytes() - baseline) / mib,
            "anon_extra_mb": (harness._proc_status_bytes("RssAnon") - anon_baseline) / mib,
            "lookup_1m_random_s": lookup, "checksum": checksum}


def run_index_case(idx_path: str, case: str) -> dict:
    code = ("import json, sys; sys.path.insert(0, %r); sys.path.insert(0, %r); "
            "from loader import index_case; print(json.dumps(index_case(%r, %r)))"
            % (REPO, os.path.dirname(os.path.abspath(__file__)), idx_path, case))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--identities", type=int, default=300)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs after one warm-up")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--loaders", nargs="*", default=["torch", "dali"])
    parser.add_argument("--idx-entries", type=int, default=42_000_000, help="0 skips the index part")
    parser.add_argument("--workdir", default=None, help="scratch dir (default: a temp dir)")
    parser.add_argument("--out", default=None, help="write a markdown table here")
    args = parser.parse_args(argv)
    sys.path.insert(0, REPO)
    workdir = args.workdir or tempfile.mkdtemp(prefix="partialfc-loader-bench-")
    rows, index_rows = [], []
    try:
        from partialfc.data.pack import pack_dataset

        folder = os.path.join(workdir, "faces")
        if not os.path.isdir(folder):
            make_face_folder(folder, args.images, args.identities)
        prefix = os.path.join(workdir, "train")
        pack_dataset(folder, prefix, workers=max(args.workers), progress=False)
        for loader in args.loaders:
            for workers in args.workers:
                result = loader_throughput(prefix, loader, workers, args.batch, args.epochs)
                rows.append((loader, workers, result))
                print(f"{loader:5s} workers={workers}: {result['images_per_s']:8.0f} images/s "
                      f"({result['images']} images in {result['seconds']:.2f} s)", flush=True)
        if args.idx_entries:
            idx_path = os.path.join(workdir, "synthetic_%d.idx" % args.idx_entries)
            start = time.perf_counter()
            if not os.path.exists(idx_path):  # reuse a kept --workdir's index
                write_synthetic_idx(idx_path, args.idx_entries)
            for stale in (idx_path + ".npy",):
                if os.path.exists(stale):
                    os.remove(stale)
            print(f"wrote {args.idx_entries} index lines ({os.path.getsize(idx_path) / 2**20:.0f} MiB) "
                  f"in {time.perf_counter() - start:.1f} s", flush=True)
            for case in ("loadtxt_1m", "parse", "build_cache", "cached"):
                result = run_index_case(idx_path, case)
                index_rows.append(result)
                print(json.dumps(result), flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.out:
        write_markdown(args, rows, index_rows)
    return 0


def write_markdown(args, rows, index_rows) -> None:
    command = "python benchmarks/loader.py " + " ".join(sys.argv[1:])
    parts = ["# Loader benchmark", "", *harness.provenance_lines(command),
             f"- Load average (1 min) at the end: {harness.load_average()} on "
             f"{os.cpu_count()} cores; other jobs shared them, so absolute numbers are pessimistic",
             "", f"## Throughput ({args.images} synthetic 112x112 JPEGs, batch {args.batch}, CPU)", "",
             harness.markdown_table(["loader", "workers / threads", "images/s"],
                                    [[loader, workers, f"{r['images_per_s']:.0f}"]
                                     for loader, workers, r in rows])]
    if index_rows:
        names = {"loadtxt_1m": "np.loadtxt, first 1 M lines only", "parse": "parse text (no cache)",
                 "build_cache": "parse + write .npy cache", "cached": "memory-mapped .npy cache"}
        parts += ["", f"## Index of {args.idx_entries:,} entries", "",
                  "Memory columns are deltas of the loading process: peak "
                  f"({index_rows[0]['memory_method']}), resident = VmRSS (includes file pages of "
                  "the memory-mapped index once touched), anon = RssAnon (private memory). "
                  "Measured after 1 M random lookups.", "",
                  harness.markdown_table(
                      ["how", "entries", "load s", "peak extra MB", "resident extra MB",
                       "anon extra MB", "1 M random lookups s"],
                      [[names[r["case"]], f"{r['entries']:,}", f"{r['seconds']:.2f}",
                        f"{r['peak_extra_mb']:.0f}", f"{r['resident_extra_mb']:.0f}",
                        f"{r['anon_extra_mb']:.0f}", f"{r['lookup_1m_random_s']:.3f}"]
                       for r in index_rows])]
    harness.write_atomic(args.out, "\n".join(parts) + "\n")


if __name__ == "__main__":
    sys.exit(main())
