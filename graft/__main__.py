"""``python -m graft``: the ``graft`` command line (the same as the console script)."""
from graft.compiler.driver.cli import main

if __name__ == "__main__":
    main()
