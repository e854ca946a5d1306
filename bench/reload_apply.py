"""The worker's CPU to apply a reloaded config in place (issue #11), for N proxy hosts.

    python bench/reload_apply.py [--hosts 1000] [--rounds 20]

Unpickling the validated config (what a worker does with the supervisor's message), parsing
its TOML (for comparison: what the worker would do with the text) and the swap itself
(swap.py: router, pools, policy) are timed apart with time.process_time, in one process, on a
context holding the previous config's pools.
"""

from __future__ import annotations

import argparse
import asyncio
import pickle
import statistics
import time

from charon.config import load_config_text
from charon.config.sharing import share_equal
from charon.worker.context import WorkerContext
from charon.worker.swap import apply_config
from charon.worker.telemetry import Telemetry


def config(hosts: int, port_base: int) -> str:
    parts = ['[server]\nlisten = ["127.0.0.1:8080"]\nworkers = 2\n']
    for i in range(hosts):
        parts.append(
            f'[[hosts]]\ndomains = ["h{i}.example.org", "*.h{i}.example.org"]\n'
            f'upstream = "http://127.0.0.1:{port_base + i % 500}"\n'
            f'[[hosts.locations]]\npath = "/ws"\nupstream = "http://127.0.0.1:{9000 + i % 50}"\n'
        )
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    loop = asyncio.new_event_loop()
    texts = [config(args.hosts, 20000), config(args.hosts, 30000)]
    ctx = WorkerContext(loop, load_config_text(texts[0], "a.toml"), Telemetry(None, None, False))  # type: ignore[arg-type]
    pickled = [
        pickle.dumps(share_equal(load_config_text(t, "b.toml")), pickle.HIGHEST_PROTOCOL)
        for t in texts
    ]  # as charon/supervisor/inplace.py sends it
    parse, load, swap = [], [], []
    for r in range(args.rounds):
        t0 = time.process_time()
        load_config_text(texts[(r + 1) % 2], "b.toml")
        t1 = time.process_time()
        cfg = pickle.loads(pickled[(r + 1) % 2])
        t2 = time.process_time()
        apply_config(ctx, cfg)
        t3 = time.process_time()
        parse.append(t1 - t0)
        load.append(t2 - t1)
        swap.append(t3 - t2)
    total = [a + b for a, b in zip(load, swap, strict=True)]
    print(f"{args.hosts} hosts ({len(texts[0])} bytes of TOML, {len(pickled[0])} pickled), "
          f"medians: unpickle {statistics.median(load) * 1000:.2f} ms + swap "
          f"{statistics.median(swap) * 1000:.2f} ms = {statistics.median(total) * 1000:.2f} ms "
          f"per worker (parsing the TOML instead: {statistics.median(parse) * 1000:.2f} ms)")


if __name__ == "__main__":
    main()
