import os
import sys

# Workers started with "spawn" import the test modules by name: keep this folder importable.
sys.path.insert(0, os.path.dirname(__file__))
# One thread per process: tests start several ranks on a 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The graph cache (autotp.cache) of a test session lives in a fresh folder: no entry from
# another run is used, and a model a later test builds again is rebuilt from it, as in use.
if "AUTOTP_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["AUTOTP_CACHE_DIR"] = tempfile.mkdtemp(prefix="autotp-test-cache-")
    atexit.register(shutil.rmtree, os.environ["AUTOTP_CACHE_DIR"], ignore_errors=True)
