"""`python -m ft_assets ...`: the command line (ft_assets/cli/main.py)."""

import sys

from ft_assets.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
