"""Open time and resident memory: a mix665k-shaped JSON file with ``json.load`` vs the converted directory.

    python benchmarks/records_open.py [--records 665298] [--workdir /tmp/llavakit-records-bench]

Generates a synthetic file shaped like LLaVA's llava_v1_5_mix665k.json (665,298 records, ~6% text-only,
multi-turn VQA-style conversations, ~1 GB), converts it with ``llavakit data convert`` and measures, each in
a fresh process: the time to get usable records and the process's RSS after it, for (a) ``json.load`` of the
file (what the original does in every rank), (b) opening the converted directory with its stored
validation, and (c) a forked data-loader worker reading 10,000 random records from it (its private memory).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

WORDS = ("the a of to in is on with what where how many colour person table image left right red blue sign "
         "street car dog cat two three sitting standing holding picture shown building window white black").split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize()


def generate(path: str, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    sources = [("coco/train2017/{:012d}.jpg", 0.55), ("gqa/images/{}.jpg", 0.14), ("ocr_vqa/images/{}.jpg", 0.12),
               ("textvqa/train_images/{:016x}.jpg", 0.035), ("vg/VG_100K/{}.jpg", 0.115)]
    with open(path, "w", encoding="utf-8") as f:
        f.write("[")
        for i in range(n):
            rec: dict = {"id": f"{i:09d}"}
            if rng.random() > 0.06:
                pattern = rng.choices([s for s, _ in sources], weights=[w for _, w in sources])[0]
                rec["image"] = pattern.format(rng.randrange(10**9))
            turns = []
            for t in range(rng.choice((1, 2, 3, 4, 6, 8, 10))):
                q = sentence(rng, rng.randint(5, 25)) + "?"
                if t == 0 and "image" in rec:
                    q = "<image>\n" + q
                turns += [{"from": "human", "value": q}, {"from": "gpt", "value": sentence(rng, rng.randint(1, 60))}]
            rec["conversations"] = turns
            f.write(("," if i else "") + json.dumps(rec))
        f.write("]")


PROBE = r"""
import json, os, random, resource, sys, time
mode, path = sys.argv[1], sys.argv[2]
def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
t0 = time.perf_counter()
if mode == "json":
    with open(path) as f:
        records = json.load(f)
    n = len(records)
else:
    from llavakit.data.records import load_records
    store, valid, problems = load_records(path, strict=False)
    n = len(valid)
opened = time.perf_counter() - t0
out = {"mode": mode, "records": n, "open_seconds": round(opened, 2), "rss_mb": round(rss_mb(), 1)}
if mode == "converted":
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a data-loader worker: read random records, report its private (unshared) memory
        rng = random.Random(0)
        t1 = time.perf_counter()
        for _ in range(10000):
            store.raw(rng.randrange(len(store)))
        dt = time.perf_counter() - t1
        private = 0
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith(("Private_Dirty:", "Private_Clean:")):
                    private += int(line.split()[1])
        os.write(w, json.dumps({"worker_private_mb": round(private / 1024, 1),
                                "worker_us_per_record": round(dt / 10000 * 1e6, 1)}).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    out.update(json.loads(os.read(r, 10000)))
print(json.dumps(out))
"""


def probe(mode: str, path: str) -> dict:
    r = subprocess.run([sys.executable, "-c", PROBE, mode, path], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=665298)
    ap.add_argument("--workdir", default="/tmp/llavakit-records-bench")
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    src = os.path.join(args.workdir, "mix665k_shaped.json")
    conv = os.path.join(args.workdir, "converted")
    if not os.path.isfile(src):
        t = time.perf_counter()
        generate(src, args.records)
        print(f"generated {src}: {os.path.getsize(src) / 2**20:.0f} MiB in {time.perf_counter() - t:.0f} s")
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "llavakit", "data", "convert", "--data_path", src, "--output", conv],
                   check=True)
    print(f"convert: {time.perf_counter() - t:.1f} s")
    for mode, path in (("json", src), ("converted", conv)):
        print(json.dumps(probe(mode, path)))


if __name__ == "__main__":
    main()
