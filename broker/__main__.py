"""`python -m broker` is the `token-broker` command."""

import sys

from broker.cli import main

sys.exit(main())
