"""Memory of N concurrent trials sharing one token store vs one trial: no copy of the data.

Writes a token store of `--store-mb` MB (random ids, the on-disk format of `trainables.tokens`)
and starts N trial processes at once. Each receives the `TokenStore` by pickling (which re-maps
the files, as a Ray trial does), reads every token once (so every page of the store is in its
address space), trains a small model for a few steps with `trainables.trainer.train`, then
reports its memory from /proc/self/smaps_rollup while all N are alive:
- RSS counts every resident page, shared ones included: each trial's RSS contains the store;
- USS (private pages) is what a trial owns alone: it must not grow with the store;
- PSS splits shared pages between the processes using them: the sum of PSS is the real total.
The store's own mapping is also measured (RSS of train.bin in each trial, PSS summed over
trials): shared, every trial sees all of it and together they hold it once. (With one trial
its pages count as private: smaps calls a page private when one process maps it.)
If the data were copied per trial, USS would hold the store and the total would grow by the
store's size per trial (the control row does exactly that); shared, the total grows by one
trial's USS.

    python bench/memory.py                    # 1, 2, 4, 8 trials and the control, 256 MB store
    python bench/memory.py --trials 1 4 --store-mb 64 --steps 5 --control 0
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import tempfile
from pathlib import Path

import numpy as np
from benchlib import add_out, describe, machine, table, write

FIELDS = ("Rss", "Pss", "Private_Clean", "Private_Dirty", "Shared_Clean", "Shared_Dirty")


def smaps() -> dict[str, float]:
    """MB of each smaps_rollup field of this process."""
    out = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in FIELDS:
            out[key] = int(rest.split()[0]) / 1024
    return out


def store_mapping(path: str) -> dict[str, float]:
    """MB of Rss, Pss and private pages of the mapping(s) of `path` in this process."""
    out, inside = {"Rss": 0.0, "Pss": 0.0, "Private": 0.0}, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5:  # a mapping's header line
            inside = line.endswith(path)
        elif inside and head[0].rstrip(":") in ("Rss", "Pss"):
            out[head[0].rstrip(":")] += int(head[1]) / 1024
        elif inside and head[0] in ("Private_Clean:", "Private_Dirty:"):
            out["Private"] += int(head[1]) / 1024
    return out


def write_store(root: Path, n_tokens: int, vocab: int) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", n_tokens), ("val", 1 << 16)):
        ids = rng.integers(0, vocab, n, dtype=np.uint16)
        ids.tofile(root / f"{split}.bin")
    meta = {
        "version": 1,
        "vocab_size": vocab,
        "dtype": "uint16",
        "n_train_tokens": n_tokens,
        "n_val_tokens": 1 << 16,
        "val_bytes": 3 << 16,
    }
    (root / "meta.json").write_text(json.dumps(meta))


def trial(store, steps: int, copy: bool, ready, results) -> None:
    """One trial: touch the whole store, train, then report memory once every trial is here.
    `copy` is the control: the trial holds its own copy of the tokens, as a naive loader would."""
    import dataclasses

    import torch

    from trainables.shapes import get_config
    from trainables.trainer import TrainConfig, train

    torch.set_num_threads(1)
    if copy:
        store = dataclasses.replace(store, train=np.array(store.train))
    checksum = sum(
        int(store.train[i : i + (1 << 22)].sum()) for i in range(0, len(store.train), 1 << 22)
    )
    cfg = get_config("micro-64", vocab_size=store.meta["vocab_size"], max_seq_len=64)
    tc = TrainConfig(
        tokens=steps * 8 * 64,
        batch_size=8,
        seq_len=64,
        eval_tokens=64,
        checkpoint_every=0,
        precision="fp32",
    )
    train(cfg, tc, store)
    ready.wait()  # all trials alive at once with the store mapped
    mem = smaps()
    mem["store"] = store_mapping(str(Path(store.root) / "train.bin"))
    mem["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    mem["checksum"] = checksum
    results.put(mem)
    ready.wait()  # stay alive until every trial has measured


def run(n: int, store, steps: int, copy: bool = False) -> list[dict]:
    ctx = mp.get_context("spawn")  # fresh interpreters, like Ray's worker processes
    ready, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=trial, args=(store, steps, copy, ready, results)) for _ in range(n)]
    for p in procs:
        p.start()
    mems = [results.get(timeout=600) for _ in range(n)]
    for p in procs:
        p.join()
    return mems


def summarize(n: int, mems: list[dict], store_mb: float, copy: bool = False) -> dict:
    uss = [m["Private_Clean"] + m["Private_Dirty"] for m in mems]
    return {
        "data": "copied per trial (control)" if copy else "shared store",
        "trials": n,
        "store_mb": store_mb,
        "rss_per_trial": max(m["Rss"] for m in mems),
        "peak_rss_per_trial": max(m["peak_rss"] for m in mems),
        "uss_per_trial": max(uss),
        "shared_per_trial": max(m["Shared_Clean"] + m["Shared_Dirty"] for m in mems),
        "store_rss_per_trial": max(m["store"]["Rss"] for m in mems),
        "store_pss_sum": sum(m["store"]["Pss"] for m in mems),
        "total_pss": sum(m["Pss"] for m in mems),
        "sum_rss": sum(m["Rss"] for m in mems),
        "same_data": len({m["checksum"] for m in mems}) == 1,
    }


COLUMNS = {
    "data": "s",
    "trials": "d",
    "store_mb": ",.0f",
    "peak_rss_per_trial": ",.0f",
    "store_rss_per_trial": ",.0f",
    "store_pss_sum": ",.0f",
    "uss_per_trial": ",.0f",
    "sum_rss": ",.0f",
    "total_pss": ",.0f",
    "extra_pss_per_trial": ",.0f",
}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--store-mb", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--control", type=int, default=2, help="trials of the copy control; 0: none")
    add_out(p, "memory")
    args = p.parse_args(argv)
    info = machine()
    print(describe(info))
    from trainables.tokens import TokenStore

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-store-") as d:
        write_store(Path(d), args.store_mb * (1 << 20) // 2, vocab=4096)
        store = TokenStore.open(d)
        for n in args.trials:
            rows.append(summarize(n, run(n, store, args.steps), args.store_mb))
            print(f"  {n} trials: total PSS {rows[-1]['total_pss']:,.0f} MB", flush=True)
        if args.control:
            n = args.control
            rows.append(summarize(n, run(n, store, args.steps, copy=True), args.store_mb, True))
    one = rows[0]["total_pss"] / rows[0]["trials"]
    for row in rows:
        row["extra_pss_per_trial"] = (row["total_pss"] - one) / max(row["trials"] - 1, 1)
    print("\nMB; RSS counts shared pages in every process, PSS splits them (sum = real total)")
    print(table(rows, COLUMNS))
    write(args.out, info, rows, args=vars(args) | {"out": str(args.out)})
    return rows


if __name__ == "__main__":
    main()
