"""``python -m shm [BASE_ID]``: print the stats of a running trioxy (Envoy's text format)."""

from __future__ import annotations

import sys

from shm.segment import Segment, SegmentError, format_stats, read_stats


def main(argv: list[str]) -> int:
    base_id = int(argv[0]) if argv else 0
    try:
        seg = Segment.open(base_id, create=False, reclaim_stale=False)
    except SegmentError as exc:
        print(f"trioxy stats: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(format_stats(read_stats(seg)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
