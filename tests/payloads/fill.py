"""A rank that prints more than its host's disk can hold, then exits 3 (`fill.py KIB`)."""

import sys

line = "x" * 1023
for _ in range(int(sys.argv[1])):
    print(line, flush=False)
sys.stdout.flush()
sys.exit(3)
