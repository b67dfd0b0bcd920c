#!/usr/bin/env python3
"""Helpers for bench/run.sh: ports, readiness, /proc sampling, and the report.

Standard library only. Subcommands:

  free-ports N                    print N free TCP ports on 127.0.0.1, one a line
  wait-http URL TIMEOUT_S [CODE [PID]]
                                  poll URL until it answers CODE (default 200); give up
                                  early if process PID exits
  check URL BYTES                 one GET: exit 0 if 200 with a BYTES-byte body
  cpu-ticks PID                   utime+stime of PID and all its descendants (clock ticks)
  cpu-snapshot SHELL_PID          "machine_busy_ticks our_ticks uptime_s"
  foreign-cpu SNAP0 SNAP1 CLK_TCK % of the machine's CPU used by others between two snapshots
  mem PID                         "VmRSS_kB VmHWM_kB", summed over PID and its descendants
  mem-record PID SCENARIO WHEN    the same as one JSON line (WHEN: start, idle, end)
  record OHA_JSON SCENARIO MODE ROUND CPU_TICKS_DELTA|- CLK_TCK
                                  turn one oha JSON file into one JSON line
  progress                        one line of progress for the JSON line on stdin
  report RUNS.jsonl MEM.jsonl META.json
                                  print the markdown report
"""

import json
import os
import socket
import statistics
import sys
import time
import urllib.error
import urllib.request

# ---------------------------------------------------------------- processes


def _children():
    """Map ppid -> [pid] for every process on the machine."""
    kids = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
        fields = stat[stat.rindex(")") + 2 :].split()
        kids.setdefault(int(fields[1]), []).append(int(entry))
    return kids


def process_tree(pid):
    """PID and all its descendants (nginx: master + workers)."""
    kids = _children()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def cpu_ticks(pid):
    total = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        # Fields 14 and 15 of proc(5) (utime, stime); fields[0] here is field 3.
        total += int(fields[11]) + int(fields[12])
    return total


def threads(pid):
    n = 0
    for p in process_tree(pid):
        try:
            n += len(os.listdir(f"/proc/{p}/task"))
        except OSError:
            continue
    return n


def mem_kb(pid):
    rss = hwm = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1])
                    elif line.startswith("VmHWM:"):
                        hwm += int(line.split()[1])
        except OSError:
            continue
    return rss, hwm


def cpu_snapshot(shell_pid):
    """(machine busy ticks, our ticks, uptime s): ours = the bench shell's process tree
    (upstream, proxies) plus its reaped children (oha runs, helpers)."""
    with open("/proc/stat") as f:
        cpu = f.readline().split()[1:]
    # user nice system idle iowait irq softirq steal [guest guest_nice: already in user/nice]
    v = [int(x) for x in cpu[:8]]
    busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
    with open(f"/proc/{shell_pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    reaped = int(fields[13]) + int(fields[14])  # cutime, cstime (proc(5) fields 16, 17)
    ours = cpu_ticks(shell_pid) + reaped
    with open("/proc/uptime") as f:
        up = float(f.read().split()[0])
    return busy, ours, up


def foreign_pct(snap0, snap1, clk_tck):
    """Share of the machine's CPU used by processes other than the benchmark's, in %."""
    b0, o0, u0 = (float(x) for x in snap0.split())
    b1, o1, u1 = (float(x) for x in snap1.split())
    capacity = (u1 - u0) * clk_tck * os.cpu_count()
    if capacity <= 0:
        return 0.0
    return max(0.0, (b1 - b0) - (o1 - o0)) * 100 / capacity


# ---------------------------------------------------------------- network


def free_ports(n):
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def http_get(url, timeout=2.0):
    """(status, body) for a GET; (None, b"") if nothing answered."""
    req = urllib.request.Request(url, headers={"Connection": "close"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (OSError, ValueError):
        return None, b""


def _alive(pid):
    """False once PID has exited (a zombie not yet reaped counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def wait_http(url, timeout_s, code=200, pid=None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pid is not None and not _alive(pid):
            return False
        status, _ = http_get(url, timeout=1.0)
        if status == code:
            return True
        time.sleep(0.1)
    return False


# ---------------------------------------------------------------- oha results


def record(oha_file, scenario, mode, rnd, cpu_ticks_delta, clk_tck):
    """One run as one JSON object: requests, rps, latency percentiles, errors, CPU/request."""
    with open(oha_file) as f:
        d = json.load(f)
    codes = d.get("statusCodeDistribution") or {}
    completed = sum(codes.values())
    ok = sum(v for k, v in codes.items() if k.startswith("2"))
    # oha aborts in-flight HTTP/1 requests at the deadline; that is not an error of the target.
    errors = {k: v for k, v in (d.get("errorDistribution") or {}).items() if k != "aborted due to deadline"}
    secs = d["summary"]["total"]
    pct = d.get("latencyPercentiles") or {}
    out = {
        "scenario": scenario,
        "mode": mode,
        "round": rnd,
        "seconds": secs,
        "completed": completed,
        "non_2xx": completed - ok,
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "rps": completed / secs if secs else 0.0,
        "p50_ms": (pct.get("p50") or 0) * 1e3,
        "p99_ms": (pct.get("p99") or 0) * 1e3,
        "p999_ms": (pct.get("p99.9") or 0) * 1e3,
    }
    if cpu_ticks_delta is not None and completed:
        out["cpu_us_per_req"] = cpu_ticks_delta * 1e6 / clk_tck / completed
    return out


# ---------------------------------------------------------------- report

MODES = [
    # mode, title
    ("h1", "HTTP/1.1 saturation"),
    ("h2", "HTTP/2 (h2c) saturation"),
    ("lat", "HTTP/1.1 fixed rate"),
]


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _fmt(x, unit=""):
    if x is None:
        return "n/a"
    if abs(x) >= 1000:
        return f"{x:,.0f}{unit}"
    if abs(x) >= 100:
        return f"{x:.0f}{unit}"
    if abs(x) >= 10:
        return f"{x:.1f}{unit}"
    return f"{x:.2f}{unit}"


def _ratio(a, b):
    if a is None or b is None or b == 0:
        return "n/a"
    return f"{a / b:.2f}×"


def _jsonl(path):
    out = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    out.append(json.loads(line))
    return out


def idle_conns(port, pid, n):
    """RSS that N idle HTTP/1.1 keep-alive client connections cost the proxy `pid`: each
    connection sends one GET, reads the whole answer, then stays open and idle. The
    requests go one after another, so the upstream side stays one pooled connection and
    the figure is the downstream connections' own."""
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < n + 64:
        n = max(0, hard - 64)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    rss0, _ = mem_kb(pid)
    socks = []
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = s.recv(65536)
                if not chunk:
                    raise RuntimeError("connection closed before the answer")
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(body) < length:
                chunk = s.recv(65536)
                if not chunk:
                    raise RuntimeError("connection closed mid-body")
                body += chunk
            socks.append(s)
        time.sleep(1)
        rss1, _ = mem_kb(pid)
    finally:
        for s in socks:
            s.close()
    return {"conns": n, "rss_before_kb": rss0, "rss_after_kb": rss1,
            "bytes_per_conn": (rss1 - rss0) * 1024 / n if n else None}


def report(runs_file, mem_file, meta_file):
    with open(meta_file) as f:
        meta = json.load(f)
    runs = _jsonl(runs_file)
    mem = {}
    for m in _jsonl(mem_file):
        d = mem.setdefault(m["scenario"], {})
        if m["when"] == "start":
            d["start_rss_kb"] = m["rss_kb"]
        elif m["when"] == "idle":
            d["idle_rss_kb"] = m["rss_kb"]
            d["tasks"] = f"{m.get('processes', '?')} / {m.get('threads', '?')}"
        elif m["when"] == "idle-conns":
            d["idle_conn_bytes"] = m.get("bytes_per_conn")
            d["idle_conns"] = m.get("conns")
            continue
        # The kernel's RSS counters are approximate (per-CPU batches), so a later VmHWM can
        # read a little lower than an earlier one: the peak is the highest seen.
        d["peak_hwm_kb"] = max(d.get("peak_hwm_kb", 0), m["hwm_kb"])
    scenarios = meta["scenarios"]
    skipped = meta.get("skipped", {})

    def med(scn, mode, key):
        return _median([r.get(key) for r in runs if r["scenario"] == scn and r["mode"] == mode])

    def spread(scn, mode, key):
        xs = [r.get(key) for r in runs if r["scenario"] == scn and r["mode"] == mode and r.get(key) is not None]
        if len(xs) < 2:
            return ""
        return f" [{_fmt(min(xs))}–{_fmt(max(xs))}]"

    # metric key -> (label, getter, unit, lower_is_better)
    metrics = []
    for mode, title in MODES:
        if not any(r["mode"] == mode for r in runs):
            continue
        if mode in ("h1", "h2"):
            metrics.append((f"{mode}.rps", f"{title}: requests/s", lambda s, m=mode: med(s, m, "rps"), "", False))
            metrics.append(
                (f"{mode}.cpu", f"{title}: proxy CPU µs/request", lambda s, m=mode: med(s, m, "cpu_us_per_req"), "", True)
            )
        else:
            for key, lab in (("p50_ms", "p50"), ("p99_ms", "p99"), ("p999_ms", "p99.9")):
                metrics.append(
                    (f"lat.{key}", f"{title} {meta['rate']} req/s: {lab} latency (ms)", lambda s, k=key: med(s, "lat", k), "", True)
                )
            metrics.append(
                ("lat.cpu", f"{title} {meta['rate']} req/s: proxy CPU µs/request", lambda s: med(s, "lat", "cpu_us_per_req"), "", True)
            )
    metrics.append(("rss.start", "RSS after start (MiB)", lambda s: _mib(mem.get(s, {}).get("start_rss_kb")), "", True))
    metrics.append(("rss.idle", "RSS idle after warm-up (MiB)", lambda s: _mib(mem.get(s, {}).get("idle_rss_kb")), "", True))
    metrics.append(("rss.peak", "Peak RSS, VmHWM (MiB)", lambda s: _mib(mem.get(s, {}).get("peak_hwm_kb")), "", True))
    idle_n = max((d.get("idle_conns") or 0 for d in mem.values()), default=0)
    if idle_n:
        metrics.append((
            "rss.idle_conn", f"RSS per idle keep-alive connection, {idle_n} open (KiB)",
            lambda s: None if mem.get(s, {}).get("idle_conn_bytes") is None else mem[s]["idle_conn_bytes"] / 1024,
            "", True,
        ))

    out = []
    w = out.append
    w(f"# wasmesh benchmark results{' (QUICK mode: smoke test, not for quoting)' if meta.get('quick') else ''}")
    w("")
    w(f"- date: {meta['date']}")
    w(f"- machine: {meta['machine']}")
    w(f"- versions: {meta['versions']}")
    w(
        f"- method: {meta['repeats']} interleaved round(s) × {meta['duration']} s per measurement, median shown"
        f" [min–max over rounds]; saturation: HTTP/1.1 `-c {meta['conns']}`, HTTP/2 `-c {meta['h2_conns']} -p {meta['h2_parallel']}`;"
        f" fixed rate: `-q {meta['rate']} --latency-correction -c {meta['conns']}`;"
        f" upstream replies {meta['body_size']} bytes; proxies on CPU 0, oha and upstream on CPU 1"
    )
    foreign = meta.get("foreign_cpu_pct")
    if foreign is not None:
        w(f"- other processes used {foreign:.1f}% of the machine's CPU time during the measurements")
        if foreign > 5:
            w("- **warning: the machine was busy with other work during the run;"
              " the figures are noisy, latency percentiles most of all**")
    for s, why in skipped.items():
        w(f"- **{s} not measured**: {why}")

    # What each proxy runs as, to show the configurations really are one worker each.
    tasks = [mem.get(s, {}).get("tasks") for s in scenarios if s != "direct"]
    if any(tasks):
        w("- processes / threads of each proxy when idle: " + ", ".join(
            f"{s} {mem.get(s, {}).get('tasks', 'n/a')}" for s in scenarios if s != "direct" and s not in skipped))
    w("")

    # Main table: absolute figures, with the ratio to direct for the request figures.
    w("| metric | " + " | ".join(scenarios) + " |")
    w("|---|" + "---|" * len(scenarios))
    for key, label, get, unit, _lower in metrics:
        cells = []
        for s in scenarios:
            if s == "direct" and (key.endswith(".cpu") or key.startswith("rss.")):
                cells.append("—")
                continue
            v = get(s)
            cell = _fmt(v, unit)
            if s != "direct" and "direct" in scenarios and not key.endswith(".cpu") and not key.startswith("rss."):
                d = get("direct")
                if v is not None and d:
                    cell += f" ({_ratio(v, d)})"
            mode, _, field = key.partition(".")
            if mode in ("h1", "h2") and field == "rps":
                cell += spread(s, mode, "rps")
            cells.append(cell)
        w(f"| {label} | " + " | ".join(cells) + " |")
    w("")
    w("Figures in parentheses: ratio to `direct` (the upstream with no proxy; it is the ceiling, since")
    w("oha and the upstream share CPU 1 in every scenario).")
    w("")

    # Errors, so a fast-but-failing proxy shows.
    bad = [r for r in runs if r["errors"] or r["non_2xx"]]
    if bad:
        w("**Errors seen** (these runs are suspect):")
        w("")
        for r in bad:
            w(f"- {r['scenario']} {r['mode']} round {r['round']}: {r['non_2xx']} non-2xx, {r['errors']} errors {r['error_kinds']}")
        w("")
    else:
        w("Every request of every run got a 2xx answer.")
        w("")

    # Pairwise ratios between proxies.
    proxies = [s for s in scenarios if s != "direct" and s not in skipped]
    if len(proxies) >= 2:
        w("## Proxies relative to each other (A / B)")
        w("")
        w("Higher is better for requests/s; lower is better for latency, CPU and memory.")
        w("")
        pairs = [(a, b) for i, a in enumerate(proxies) for b in proxies[i + 1 :]]
        w("| metric | " + " | ".join(f"{a} / {b}" for a, b in pairs) + " |")
        w("|---|" + "---|" * len(pairs))
        for key, label, get, _unit, _lower in metrics:
            w(f"| {label} | " + " | ".join(_ratio(get(a), get(b)) for a, b in pairs) + " |")
        w("")
    return "\n".join(out)


def _mib(kb):
    return None if kb is None else kb / 1024


# ---------------------------------------------------------------- main


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, args = argv[1], argv[2:]
    if cmd == "free-ports":
        print("\n".join(str(p) for p in free_ports(int(args[0]))))
    elif cmd == "wait-http":
        code = int(args[2]) if len(args) > 2 else 200
        pid = int(args[3]) if len(args) > 3 else None
        return 0 if wait_http(args[0], float(args[1]), code, pid) else 1
    elif cmd == "check":
        status, body = http_get(args[0], timeout=5.0)
        if status == 200 and len(body) == int(args[1]):
            return 0
        print(f"check {args[0]}: status {status}, {len(body)} body bytes, want 200 and {args[1]}", file=sys.stderr)
        return 1
    elif cmd == "cpu-ticks":
        print(cpu_ticks(int(args[0])))
    elif cmd == "cpu-snapshot":
        print(*cpu_snapshot(int(args[0])))
    elif cmd == "foreign-cpu":
        print(f"{foreign_pct(args[0], args[1], int(args[2])):.1f}")
    elif cmd == "mem":
        rss, hwm = mem_kb(int(args[0]))
        print(rss, hwm)
    elif cmd == "mem-record":
        rss, hwm = mem_kb(int(args[0]))
        print(
            json.dumps(
                {
                    "scenario": args[1],
                    "when": args[2],
                    "rss_kb": rss,
                    "hwm_kb": hwm,
                    "processes": len(process_tree(int(args[0]))),
                    "threads": threads(int(args[0])),
                }
            )
        )
    elif cmd == "idle-conns":
        # idle-conns PORT PID SCENARIO N: one JSON line for the memory file
        r = idle_conns(int(args[0]), int(args[1]), int(args[3]))
        r.update({"scenario": args[2], "when": "idle-conns", "hwm_kb": mem_kb(int(args[1]))[1]})
        print(f"[bench] {args[2]}: {r['conns']} idle connections, {r['bytes_per_conn']:.0f} bytes of RSS each",
              file=sys.stderr)
        print(json.dumps(r))
    elif cmd == "record":
        # record OHA_JSON SCENARIO MODE ROUND CPU_TICKS_DELTA|- CLK_TCK
        ticks = None if args[4] == "-" else int(args[4])
        print(json.dumps(record(args[0], args[1], args[2], int(args[3]), ticks, int(args[5]))))
    elif cmd == "progress":
        r = json.loads(sys.stdin.read())
        cpu = r.get("cpu_us_per_req")
        line = (
            f"[bench]   round {r['round']} {r['mode']:>3} {r['scenario']:<12} {r['rps']:>9,.0f} req/s"
            f"  p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms  p99.9 {r['p999_ms']:.3f} ms"
        )
        if cpu is not None:
            line += f"  cpu {cpu:.1f} us/req"
        if r["errors"] or r["non_2xx"]:
            line += f"  ERRORS {r['errors']} non-2xx {r['non_2xx']} {r['error_kinds']}"
        print(line)
    elif cmd == "report":
        print(report(args[0], args[1], args[2]))
    else:
        print(f"unknown command {cmd}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
