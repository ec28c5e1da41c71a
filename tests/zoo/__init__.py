"""Hand-written modules, each simulated at several tp against its unsharded self (tests/test_zoo.py)."""
