#!/usr/bin/env python3
"""Where a mirrored guest write waits: joins the debug logs of `tern export` and `tern serve`.

Run a live case with the daemons' logs kept and debug on, e.g.
    RUST_LOG=info,tern_engine=debug tern-bench nbd --unpaced --queue-depth 8 --reps 1 \
        --dir D --keep-logs
then `bench/tools/mirror_latency.py D/CASE-tern-rep-1-export.log D/CASE-tern-rep-1-serve.log`.
Prints, for mirrors started during the bulk pass and after it, the percentiles (ms) of each
step: source (guest write completed -> request sent), link and target's loop, target (request
received -> acknowledgement sent), back, and the whole (as the source driver measured it).
Both logs carry wall-clock timestamps of one machine.
"""
import re
import sys

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def seconds(line):
    h, m, s = line[11:26].split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def lines(path):
    with open(path) as f:
        for line in f:
            yield ANSI.sub("", line)


def quantiles(values):
    values = sorted(values)
    n = len(values)
    if not n:
        return "n=0"
    pick = lambda q: values[min(n - 1, int(n * q))]
    return "n=%d p10 %.1f p50 %.1f p90 %.1f p99 %.1f" % (
        n, pick(0.1), pick(0.5), pick(0.9), pick(0.99))


def main(export_log, serve_log):
    start, sent, received, acked, back, total = {}, {}, {}, {}, {}, {}
    bulk_done = float("inf")
    for line in lines(export_log):
        if "bulk pass sent" in line:
            bulk_done = seconds(line)
        if m := re.search(r"mirror started token=(\d+)", line):
            start[int(m[1])] = seconds(line)
        if m := re.search(r"mirror request sent token=(\d+)", line):
            sent[int(m[1])] = seconds(line)
        if m := re.search(r"MirrorAck \{ tokens: \[([\d, ]+)\]", line):
            for t in m[1].split(","):
                back[int(t)] = seconds(line)
        if m := re.search(r"mirror finished token=(\d+) us=(\d+)", line):
            total[int(m[1])] = int(m[2]) / 1000
    for line in lines(serve_log):
        if m := re.search(r"MirrorRequest \{ token: (\d+)", line):
            received[int(m[1])] = seconds(line)
        if m := re.search(r"mirror acknowledgement sent tokens=\[([\d, ]+)\]", line):
            for t in m[1].split(","):
                acked[int(t)] = seconds(line)
    for name, during in (("during the bulk pass", True), ("after it", False)):
        tokens = [t for t in start if (start[t] < bulk_done) == during
                  and all(t in d for d in (sent, received, acked, back, total))]
        print(name)
        print("  source: write -> request sent ", quantiles([(sent[t] - start[t]) * 1e3 for t in tokens]))
        print("  request on the way           ", quantiles([(received[t] - sent[t]) * 1e3 for t in tokens]))
        print("  target: request -> ack       ", quantiles([(acked[t] - received[t]) * 1e3 for t in tokens]))
        print("  ack on the way               ", quantiles([(back[t] - acked[t]) * 1e3 for t in tokens]))
        print("  whole, source driver         ", quantiles([total[t] for t in tokens]))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
