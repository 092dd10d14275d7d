"""`python -m fixres_deploy.cli COMMAND ...`: the same entry point as the `fixres-deploy` script."""

import sys

from fixres_deploy.cli.app import main

sys.exit(main())
