"""``python -m shm [BASE_ID]``: print the stats of a running trioxy (Envoy's text format)."""

from __future__ import annotations

import sys

from shm.segment import Segment, SegmentError, format_stats, read_stats

USAGE = "usage: python -m shm [BASE_ID]   (the --base-id trioxy runs with; default 0)"


def main(argv: list[str]) -> int:
    if len(argv) > 1 or (argv and not argv[0].lstrip("-").isdigit()):
        print(USAGE, file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    base_id = int(argv[0]) if argv else 0
    try:
        seg = Segment.open(base_id, create=False, reclaim_stale=False)
    except SegmentError as exc:
        print(f"trioxy stats: {exc}", file=sys.stderr)
        return 1
    try:
        sys.stdout.write(format_stats(read_stats(seg)))
    finally:
        seg.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
