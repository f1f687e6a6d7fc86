"""The drill's picture (optional: ``pip install trioxy[drill]`` brings matplotlib).

Requests/s with failures, p99 latency and epochs alive over time, with the scenario's
actions as markers: HUPs grey, kills red, new epochs serving green.
"""

from __future__ import annotations

from typing import Any


def matplotlib_missing() -> str | None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return ("--plot needs matplotlib, which is not installed: "
                "pip install 'trioxy[drill]' (or pip install matplotlib)")
    return None


def plot(report: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: the drill runs in CI and over ssh
    import matplotlib.pyplot as plt

    s = report["series"]
    xs = list(range(len(s["requests"])))
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, sharex=True, figsize=(11, 7),
                                        gridspec_kw={"height_ratios": [3, 2, 1]})
    ok = [max(0, r - f - k) for r, f, k in zip(s["requests"], s["failed"],
                                               s["killed_in_flight"], strict=True)]
    ax1.plot(xs, ok, color="tab:blue", label="ok req/s", drawstyle="steps-post")
    ax1.bar(xs, s["killed_in_flight"], color="tab:orange", width=1.0, align="edge",
            label="failed: in flight on a killed process")
    ax1.bar(xs, s["failed"], bottom=s["killed_in_flight"], color="tab:red", width=1.0,
            align="edge", label="failed: unexplained")
    ax1.set_ylabel("requests / s")
    lat = [v if v is not None else float("nan") for v in s["latency_p99_ms"]]
    ax2.plot(xs, lat, color="tab:purple", drawstyle="steps-post", label="p99 latency (ok)")
    ax2.set_ylabel("p99 ms")
    ax2.set_yscale("log")
    ex = [t for t, _ in s["epochs_alive"]]
    ey = [n for _, n in s["epochs_alive"]]
    ax3.step(ex, ey, where="post", color="black")
    ax3.set_ylabel("epochs")
    ax3.set_xlabel("seconds")
    ax3.set_ylim(0, max(ey + [3]) + 0.5)
    for ax in (ax1, ax2, ax3):
        for a in report["actions"]:
            if a["kind"] == "hup":
                ax.axvline(a["t"], color="grey", linestyle="--", linewidth=0.7)
        for k in report["kills"]:
            ax.axvline(k["t"], color="red", linewidth=1.0)
        for t in s["serves"]:
            ax.axvline(t, color="tab:green", linestyle=":", linewidth=0.8)
    ax1.plot([], [], color="grey", linestyle="--", label="SIGHUP")
    ax1.plot([], [], color="red", label="kill -9")
    ax1.plot([], [], color="tab:green", linestyle=":", label="epoch serves")
    ax1.legend(loc="lower left", fontsize=7, ncol=3)
    verdict = "PASSED" if report["passed"] else "FAILED"
    ax1.set_title(f"trioxy-drill {report['scenario']}: {verdict} - "
                  f"{report['requests']['sent']} requests, "
                  f"{report['restarts']['hot_restarts_serving']} hot restarts, "
                  f"{report['restarts']['kills']} kills")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
