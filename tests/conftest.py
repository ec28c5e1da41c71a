import os
import sys

# Workers started with "spawn" import the test modules by name: keep this folder importable.
sys.path.insert(0, os.path.dirname(__file__))
# One thread per process: tests start several ranks on a 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
