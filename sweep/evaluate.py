"""`python -m sweep.evaluate`: measure one recipe next to its baseline (the code is
in `sweep.measure.evaluate`)."""

from .measure.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
