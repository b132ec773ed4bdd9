"""sample-many on Dask: images per second with 1 and 2 workers, and the scheduler's cost per shard.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_sample_many.py

The bundled digits model through the real path (``tinylazy.sample_many``: shards as
tasks, results written by the client into a shard folder), on two LocalClusters that
stay up for the whole run, one of 1 worker process and one of 2, measured alternately
(``--reps`` pairs, medians) after every worker has loaded the model.  Target: 2 workers
at least 1.8x the images per second of 1 worker (2 cores).

Scheduler overhead per shard, on the 1-worker cluster: the round trip of an empty task
(submit, run, result), one at a time and as a batch of many; and, from the sampling
runs, wall time x workers minus the workers' compute time, per shard.
"""
import argparse
import json
import operator
import os
import statistics
import sys
import tempfile
import time

from tinylazy import cli, sample_many


def parse(argv):
    p = cli.ArgumentParser()
    sample_many.add_arguments(p)
    return p.parse_args(argv)


def timed_run(client, spec, settings, shards, workers):
    """One sampling run into a fresh shard folder: (images per second, overhead seconds per shard)."""
    with tempfile.TemporaryDirectory() as d:
        store = sample_many.ShardStore(os.path.join(d, "bench.npz.shards"), settings)
        store.open()
        t0 = time.perf_counter()
        images, busy = sample_many.compute_shards(client, spec, store, shards, lambda msg: None)
        wall = time.perf_counter() - t0
        store.close()
    return images / wall, (wall * workers - busy) / len(shards)


def empty_task_round_trips(client, n):
    """Seconds per empty task: (one at a time, median; as a batch of n, per task)."""
    one = []
    for i in range(20):
        t0 = time.perf_counter()
        client.submit(operator.add, i, 1, pure=False).result()
        one.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    client.gather(client.map(operator.add, range(n), [1] * n, pure=False))
    return statistics.median(one), (time.perf_counter() - t0) / n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num", type=int, default=256, help="images per run (default 256)")
    ap.add_argument("--batch", type=int, default=32, help="images per shard (default 32)")
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20)")
    ap.add_argument("--reps", type=int, default=3, help="alternating pairs of runs (default 3)")
    args = ap.parse_args()

    run_args = parse(["--num", str(args.num), "--batch", str(args.batch), "--steps", str(args.steps)])
    spec, settings, _ = sample_many.prepare(run_args)
    shards = sample_many.shard_ranges(args.num, args.batch)
    quiet = lambda msg: None
    with sample_many.cluster_client(1, log=quiet) as one, sample_many.cluster_client(2, log=quiet) as two:
        for client in (one, two):
            client.run(sample_many._load, spec)                   # every worker loads the model once, untimed
        rate = {1: [], 2: []}
        overhead = []
        for r in range(args.reps):
            for workers, client in ((1, one), (2, two)):
                ips, per_shard = timed_run(client, spec, settings, shards, workers)
                rate[workers].append(ips)
                overhead.append(per_shard)
                print(f"rep {r}: {workers} worker{'s' if workers > 1 else ''} {ips:.2f} images/s "
                      f"(overhead {1000 * per_shard:.0f} ms/shard)", file=sys.stderr, flush=True)
        single, batched = empty_task_round_trips(one, 200)

    ratios = [b / a for a, b in zip(rate[1], rate[2])]
    res = {"images_per_s_1": statistics.median(rate[1]), "images_per_s_2": statistics.median(rate[2]),
           "speedup": statistics.median(ratios), "speedup_min": min(ratios), "speedup_max": max(ratios),
           "overhead_per_shard_s": statistics.median(overhead), "empty_task_s": single,
           "empty_task_batched_s": batched, "num": args.num, "batch": args.batch, "steps": args.steps,
           "reps": args.reps, "cores": len(os.sched_getaffinity(0))}
    print(f"\ndigits model, DDIM {args.steps} steps, cfg 1.5, {args.num} images in shards of {args.batch}; "
          f"medians of {args.reps} alternating pairs\n")
    print("| workers | images/s | vs 1 worker |\n|---|---|---|")
    print(f"| 1 | {res['images_per_s_1']:.2f} | 1.00x |")
    print(f"| 2 | {res['images_per_s_2']:.2f} | {res['speedup']:.2f}x (per pair {min(ratios):.2f}x-{max(ratios):.2f}x)"
          f" |")
    print(f"\ntarget 2 workers >= 1.8x: {'met' if res['speedup'] >= 1.8 else 'MISSED'}")
    print(f"scheduler overhead: {1000 * res['overhead_per_shard_s']:.0f} ms per shard in the sampling runs "
          f"(wall x workers - compute); an empty task {1000 * single:.1f} ms one at a time, "
          f"{1000 * batched:.2f} ms per task in a batch of 200")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
