"""Reads `nvcc -Xptxas -v` output on stdin: prints each kernel's registers and spills, and exits 1 when a kernel
uses more registers than argv[1] or spills (CI's check of csrc/flow_scores.cu)."""

import re
import sys

limit = int(sys.argv[1])
kernel, failed, seen = None, False, 0
for line in sys.stdin:
    if m := re.search(r"Compiling entry function '(\S+)' for '(\w+)'", line):
        kernel = f"{m.group(1)} ({m.group(2)})"
    elif m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line):
        spills = int(m.group(1)) + int(m.group(2))
    elif m := re.search(r"Used (\d+) registers", line):
        registers, seen = int(m.group(1)), seen + 1
        bad = registers > limit or spills > 0
        failed |= bad
        print(f"{'FAIL' if bad else 'ok  '} {registers:3d} registers, {spills} bytes spilled: {kernel}")
if seen == 0:
    print("ptxas_check: no kernel in the input (was -Xptxas -v given?)")
sys.exit(1 if failed or seen == 0 else 0)
