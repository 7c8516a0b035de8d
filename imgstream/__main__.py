"""`python -m imgstream COMMAND ...`: the same as the `imgstream` command."""

import sys

from imgstream.cli import main

sys.exit(main())
