"""`python -m appliance ...`: see appliance/cli.py."""

import sys

from appliance.cli import main

sys.exit(main())
