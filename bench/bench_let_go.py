"""How long the control messages of a distributed job wait for gloo to let go of their tensors
(`simplenet_fast.distributed._let_go`, bounded by `_LET_GO_S`):

    torchrun --standalone --nproc-per-node 2 bench/bench_let_go.py [ROUNDS]

Each round is one broadcast, one all-gather and one gather, as a scoring job sends them; every
rank prints the median, 99th percentile and largest wait over its calls.
"""
from __future__ import annotations

import sys
import time

from simplenet_fast import distributed


def main(rounds: int) -> None:
    waits = []
    let_go = distributed._let_go

    def timed(tensors):
        start = time.perf_counter()
        let_go(tensors)
        waits.append(time.perf_counter() - start)

    distributed._let_go = timed
    with distributed.session(timeout_s=60) as world:
        for i in range(rounds):
            value = {"i": i, "blob": bytes(range(256)) * (i + 1)}
            assert distributed._broadcast(world, value if world.is_main else None, "b") == value
            distributed._all_gather(world, (i, world.rank), "g")
            distributed.gather_in_order(world, [f"{world.rank}-{i}"])
    waits.sort()
    n = len(waits)
    print(f"rank {world.rank}: {n} waits, median {1e3 * waits[n // 2]:.3f} ms, p99 "
          f"{1e3 * waits[int(n * 0.99)]:.3f} ms, max {1e3 * waits[-1]:.3f} ms "
          f"(bound {distributed._LET_GO_S:g} s)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 300)
