#!/usr/bin/env python3
"""API benchmark: wrk against a vireo daemon's TLS listener.

Starts `vireo serve` on a temporary state directory with a Unix socket and a
TLS listener on 127.0.0.1 (a self-signed certificate from openssl), an admin
token, and --vms defined (stopped) VMs; then measures with wrk:

1. `GET /v1/vms` (the whole list, every VM) with keep-alive connections:
   requests per second and latency percentiles;
2. create + delete: each connection alternates `POST /v1/vms` and
   `DELETE /v1/vms/NAME` (one connection per wrk thread).

Writes bench/results/api-<date>.json. Needs wrk and openssl (apt-get install
wrk openssl); python3 stdlib only.
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def to_ms(text):
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not m:
        return None
    v, unit = float(m.group(1)), m.group(2)
    return {"us": v / 1000, "ms": v, "s": v * 1000}[unit]


def parse_wrk(out):
    res = {"raw": out}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    res["requests_per_sec"] = float(m.group(1)) if m else None
    m = re.search(r"(\d+) requests in ([\d.]+\w+)", out)
    res["requests"] = int(m.group(1)) if m else None
    for p in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{p}%\s+(\S+)", out, re.M)
        res[f"p{p}_ms"] = to_ms(m.group(1)) if m else None
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["non_2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: (.*)", out)
    res["socket_errors"] = m.group(1) if m else None
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vireo", default=os.path.join(ROOT, "target/release/vireo"))
    ap.add_argument("--build", action="store_true", help="cargo build --release -p vireo first")
    ap.add_argument("--vms", type=int, default=100)
    ap.add_argument("--duration", default="10s")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--connections", default="4,16",
                    help="keep-alive connections for the list runs, comma-separated (one run each)")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    if args.build:
        subprocess.run(["cargo", "build", "--release", "-p", "vireo"], cwd=ROOT, check=True)
    for tool in ("wrk", "openssl"):
        if not shutil.which(tool):
            sys.exit(f"bench/api.py needs {tool}: apt-get install {tool}")
    load_before = os.getloadavg()
    tmp = tempfile.mkdtemp(prefix="vireo-api-bench.")
    vireo = os.path.join(tmp, "vireo")
    shutil.copy2(args.vireo, vireo)  # a concurrent cargo build cannot swap it
    sock = os.path.join(tmp, "api.sock")
    cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
    run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-addext", "basicConstraints=critical,CA:FALSE"])
    log = open(os.path.join(tmp, "daemon.log"), "w+")
    daemon = subprocess.Popen(
        [vireo, "serve", "--state-dir", os.path.join(tmp, "state"), "--listen", f"unix:{sock}",
         "--listen", "tcp:127.0.0.1:0", "--tls-cert", cert, "--tls-key", key,
         # the kernel below is in tmp; room for every wrk connection
         "--storage", tmp, "--max-connections",
         str(max([256] + [int(c) + 16 for c in args.connections.split(",")]))],
        stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    try:
        url = None
        deadline = time.time() + 15
        while url is None:
            if daemon.poll() is not None or time.time() > deadline:
                log.seek(0)
                sys.exit("the daemon did not start:\n" + log.read())
            log.seek(0)
            m = re.search(r"https://127\.0\.0\.1:\d+", log.read())
            if m and os.path.exists(sock):
                url = m.group(0)
            else:
                time.sleep(0.05)
        env = dict(os.environ)
        for k in ("VIREO_URL", "VIREO_TOKEN", "VIREO_CA_CERT"):
            env.pop(k, None)
        token = run([vireo, "token", "create", "--role", "admin", "--name", "bench", "--socket", sock],
                    env=env).stdout.strip()
        kernel = os.path.join(tmp, "vmlinux")
        with open(kernel, "wb") as f:
            f.write(b"\0" * 4096)
        t0 = time.time()
        for i in range(args.vms):
            run([vireo, "vm", "create", f"vm{i:03}", "--kernel", kernel, "--memory", "32",
                 "--accel", "emu", "--socket", sock], env=env)
        define_s = time.time() - t0
        auth = f"Authorization: Bearer {token}"
        wrk = ["wrk", "--latency", "-d", args.duration]
        conns = [int(c) for c in args.connections.split(",")]
        list_outs = {c: run(wrk + ["-t", str(min(args.threads, c)), "-c", str(c), "-H", auth,
                                   f"{url}/v1/vms"]).stdout for c in conns}
        cd_env = dict(env, BENCH_TOKEN=token, BENCH_KERNEL=kernel)
        cd_out = run(wrk + ["-t", str(args.threads), "-c", str(args.threads), "-s",
                            os.path.join(ROOT, "bench/api_create_delete.lua"), url], env=cd_env).stdout
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(10)
        except subprocess.TimeoutExpired:
            daemon.kill()
        shutil.rmtree(tmp, ignore_errors=True)

    lists, cd = {c: parse_wrk(o) for c, o in list_outs.items()}, parse_wrk(cd_out)
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip())
    cpu = ""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    result = {
        "benchmark": "api",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git": {"head": git, "dirty": dirty},
        "host": {"cpus": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
                 "load_before": load_before, "load_after": os.getloadavg()},
        "params": {"vms": args.vms, "duration": args.duration, "threads": args.threads,
                   "connections": args.connections, "define_100_vms_s": round(define_s, 3)},
        "list_vms": {f"{c}_connections": r for c, r in lists.items()},
        "create_delete": cd,
    }
    for c, lst in lists.items():
        print(f"GET /v1/vms ({args.vms} VMs, {c} connections): "
              f"{lst['requests_per_sec']:.0f} req/s, p50 {lst['p50_ms']} ms, p99 {lst['p99_ms']} ms, non-2xx {lst['non_2xx']}")
    print(f"POST+DELETE /v1/vms ({args.threads} connections): "
          f"{cd['requests_per_sec']:.0f} req/s, p50 {cd['p50_ms']} ms, p99 {cd['p99_ms']} ms, non-2xx {cd['non_2xx']}")
    if not args.no_save:
        os.makedirs(os.path.join(ROOT, "bench/results"), exist_ok=True)
        path = os.path.join(ROOT, "bench/results",
                            "api-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + ".json")
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        print(f"wrote {os.path.relpath(path, ROOT)}")


if __name__ == "__main__":
    main()
