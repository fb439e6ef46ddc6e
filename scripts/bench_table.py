#!/usr/bin/env python3
"""Builds the goal-vs-measured table from the JSON results of scripts/bench.sh, prints it and
rewrites the part of docs/benchmarks.md between `<!-- bench:begin -->` and `<!-- bench:end -->`.

    python3 scripts/bench_table.py RESULTS_DIR [docs/benchmarks.md]
"""
import glob
import json
import os
import platform
import sys
from datetime import datetime, timezone


def load(d, name):
    p = os.path.join(d, name + ".json")
    if not os.path.exists(p):
        return None
    with open(p) as f:
        return json.load(f)


def ms(v):
    return "n/a" if v is None else f"{v:,.2f} ms" if v < 100 else f"{v:,.0f} ms"


def lat(r, key):
    return None if not r or not r.get("latency_ms") else r["latency_ms"][key]


def rate(r):
    """Deliveries per second over the time they took (older results: estimated from the run's
    length minus the generator's 2 s tail)."""
    if "delivery_seconds" in r:
        return r["delivered_per_second"]
    span = max(r["duration_seconds"], (r["measured"].get("seconds") or 0) - 2.1)
    return r["delivered"] / span


def verdict(ok):
    return "met" if ok else "**missed**"


def machine():
    cores = os.cpu_count()
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) / 1024 / 1024
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{cores} cores ({model}), {mem:.0f} GiB RAM, {platform.system()} {platform.release()}"


def main():
    d = sys.argv[1]
    doc = sys.argv[2] if len(sys.argv) > 2 else None
    rows = []
    detail = []
    for mode in ("embedded", "cluster"):
        idle = load(d, f"{mode}-idle")
        if idle is None:
            continue
        goal = 20000 if mode == "embedded" else 10000
        per_conn = idle.get("server_rss_bytes_per_connection")
        churn = idle.get("churn") or {}
        rows.append((f"memory per idle WebSocket connection, 19,000 held ({mode})", "≤ 5 KB",
                     f"{per_conn / 1000:.1f} KB" if per_conn is not None else "n/a",
                     verdict(per_conn is not None and per_conn <= 5000),
                     f"`chat-loadgen idle --connections 19000 --processes 2 --hold 15s --churn 4000`"))
        acc = churn.get("accepted_per_second")
        rows.append((f"connections accepted per second while ≥ {churn.get('held_at_least', 0):,} are held ({mode})", "≥ 2,000",
                     f"{acc:,.0f}/s" if acc else "n/a", verdict(bool(acc) and acc >= 2000),
                     "same run (churn: close and reopen 4,000, 250 per process at a time)"))
        g = load(d, f"{mode}-direct-{goal}")
        if g:
            p50, p99 = lat(g, "p50"), lat(g, "p99")
            if mode == "embedded":
                rows.append((f"send→deliver p99 at {goal:,} msgs/s offered (embedded)", "≤ 2 ms",
                             f"p99 {ms(p99)} (p50 {ms(p50)}); delivered {rate(g):,.0f}/s, lost {g['lost']}",
                             verdict(p99 is not None and p99 <= 2 and g["lost"] == 0),
                             f"`chat-loadgen --drain 180s direct --pairs 200 --rate {goal} --duration 10s`"))
            else:
                rows.append((f"send→deliver p99 / p50 at {goal:,} msgs/s (cluster)", "≤ 10 ms / ≤ 3 ms",
                             f"{ms(p99)} / {ms(p50)}; delivered {rate(g):,.0f}/s, lost {g['lost']}",
                             verdict(p99 is not None and p99 <= 10 and p50 <= 3 and g["lost"] == 0),
                             f"`chat-loadgen --drain 180s direct --pairs 200 --rate {goal} --duration 10s`"))
        s = load(d, f"{mode}-sustain")
        if s:
            pd = s.get("projection_delay_ms") or {}
            ok = s["lost"] == 0 and (pd.get("p99") or 1e9) <= 100 and rate(s) >= 0.98 * s["offered_rate"]
            rows.append((f"sustained msgs/s through gateway + log + projections, projection lag p99 ≤ 100 ms, 0 lost ({mode})", "≥ 10,000",
                         f"{s['offered_rate']:,.0f}/s for {s['duration_seconds']:.0f} s: delivered {rate(s):,.0f}/s, "
                         f"lost {s['lost']}, projection lag p50 {ms(pd.get('p50'))} p99 {ms(pd.get('p99'))}, send→deliver p99 {ms(lat(s, 'p99'))}",
                         verdict(ok and s["offered_rate"] >= 10000),
                         f"`chat-loadgen direct --pairs 200 --rate {s['offered_rate']:.0f} --duration {s['duration_seconds']:.0f}s --probe-projections`"))
        # Details: the ladder, groups, self-test.
        for path in sorted(glob.glob(os.path.join(d, f"{mode}-direct-*.json")), key=lambda p: int(p.rsplit("-", 1)[1][:-5])):
            r = json.load(open(path))
            pd = r.get("projection_delay_ms") or {}
            srv = (r["measured"].get("server") or {}).get("cpu_cores_busy")
            lg = (r["measured"].get("loadgen") or {}).get("cpu_cores_busy")
            svc = sum(((x.get("usage") or {}).get("cpu_cores_busy") or 0) for x in r["measured"].get("services") or [])
            detail.append((mode, f"one-to-one, {r['offered_rate']:,.0f}/s offered", f"{rate(r):,.0f}/s",
                           ms(lat(r, "p50")), ms(lat(r, "p99")), ms(lat(r, "p999")), ms(lat(r, "max")), r["lost"], r["duplicated"],
                           f"{pd.get('p50') and ms(pd['p50']) or '–'} / {pd.get('p99') and ms(pd['p99']) or '–'}",
                           f"{srv:.2f}" if srv is not None else "n/a", f"{svc:.2f}" if mode == "cluster" else "–",
                           f"{lg:.2f}" if lg is not None else "n/a"))
        for name in ("group-100", "group-1024", "sustain", "selftest"):
            r = load(d, f"{mode}-{name}")
            if not r:
                continue
            pd = r.get("projection_delay_ms") or {}
            srv = (r["measured"].get("server") or {}).get("cpu_cores_busy")
            lg = (r["measured"].get("loadgen") or {}).get("cpu_cores_busy")
            svc = sum(((x.get("usage") or {}).get("cpu_cores_busy") or 0) for x in r["measured"].get("services") or [])
            label = {
                "group-100": f"group of 100, {r['offered_rate']:g} msgs/s offered (×99 deliveries)",
                "group-1024": f"group of 1,024, {r['offered_rate']:g} msgs/s offered (×1,023 deliveries)",
                "sustain": f"sustained one-to-one, {r['offered_rate']:,.0f}/s for {r['duration_seconds']:.0f} s",
                "selftest": "self-test: 5 deliveries dropped, 3 doubled on purpose",
            }[name]
            detail.append((mode, label, f"{rate(r):,.0f}/s", ms(lat(r, "p50")), ms(lat(r, "p99")),
                           ms(lat(r, "p999")), ms(lat(r, "max")), r["lost"], r["duplicated"],
                           f"{pd.get('p50') and ms(pd['p50']) or '–'} / {pd.get('p99') and ms(pd['p99']) or '–'}",
                           f"{srv:.2f}" if srv is not None else "n/a", f"{svc:.2f}" if mode == "cluster" else "–",
                           f"{lg:.2f}" if lg is not None else "n/a"))
        detail.append((mode, f"idle: ramp to 19,000 connections", f"{idle.get('ramp_accepted_per_second', 0):,.0f} accepted/s",
                       "", "", "", "", "", "", "", f"{churn.get('server_cpu_cores_busy') or 0:.2f} (churn)", "", ""))

    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"Measured {when} on {machine()}; load generator on the same machine. Results: `{d}`.",
        "",
        "| goal | target | measured | verdict | command |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} | {v} | {cmd} |" for a, b, c, v, cmd in rows]
    lines += [
        "",
        "| mode | run | delivered | p50 | p99 | p99.9 | max | lost | dup | projection lag p50 / p99 | server cores | services cores | loadgen cores |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in detail]
    table = "\n".join(lines)
    print(table)
    if doc:
        text = open(doc).read()
        begin, end = "<!-- bench:begin -->", "<!-- bench:end -->"
        if begin in text and end in text:
            head, rest = text.split(begin, 1)
            _, tail = rest.split(end, 1)
            text = f"{head}{begin}\n{table}\n{end}{tail}"
        else:
            text = f"{text.rstrip()}\n\n{begin}\n{table}\n{end}\n"
        with open(doc, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
