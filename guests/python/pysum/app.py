"""A componentize-py command (CPython 3.14 inside a wasip2 component, linked from a dozen
core modules): sums the integers of each stdin line, spins the interpreter between lines,
prints running totals, and writes the result to /sum.txt."""

import os
import sys

from wit_world import exports


def mix(rounds: int) -> int:
    # Pure interpreter work with no WASI calls: only a loop check can stop it.
    x = 0x9E3779B9
    for i in range(rounds):
        x = (x * 1103515245 + 12345 + i) & 0xFFFFFFFF
    return x


class Run(exports.Run):
    def run(self) -> None:
        rounds = int(os.environ.get("ROUNDS", "100000"))
        total = 0
        lines = 0
        for line in sys.stdin:
            lines += 1
            total += sum(int(word) for word in line.split())
            print(f"line {lines}: total {total}, mix {mix(rounds):08x}", flush=True)
        with open("/sum.txt", "w") as f:
            f.write(f"{total}\n")
        print(f"pysum: {lines} lines", file=sys.stderr)
        if lines == 0:
            sys.exit(1)
