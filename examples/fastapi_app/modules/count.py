"""Prints ``--lines`` numbered lines, ``--delay`` seconds apart; ``--fail`` exits with status 3;
``--child`` first starts a child process that lives until it is stopped (its pid is printed), to
show that cancelling stops the whole process tree."""

import argparse
import subprocess
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("--lines", type=int, default=10)
parser.add_argument("--delay", type=float, default=0.1)
parser.add_argument("--fail", action="store_true")
parser.add_argument("--child", action="store_true")
args = parser.parse_args()

if args.child:
    child = subprocess.Popen(
        [sys.executable, "-c", "import time\nwhile True: time.sleep(0.2)"],
        stdout=subprocess.DEVNULL,
    )
    print(f"child pid {child.pid}", flush=True)
for i in range(args.lines):
    print(f"line {i + 1} of {args.lines}", flush=True)
    time.sleep(args.delay)
if args.fail:
    print("failing on purpose", file=sys.stderr)
    sys.exit(3)
