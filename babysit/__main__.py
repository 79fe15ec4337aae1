from __future__ import annotations

import sys

from babysit.cli.main import main

sys.exit(main())
